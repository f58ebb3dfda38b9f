"""Pooling models against transformers on the same tiny random weights: cross-encoders and
classifiers (BERT, XLM-R, Qwen2, Qwen3 ...ForSequenceClassification), RoBERTa / XLM-R encoders and
Qwen3ForCausalLM as an embedding model (last token, on the KV cache), within 1e-4 in float32;
PoolingParams (dimensions, truncate_prompt_tokens, activation), the offline LLM.classify / score /
encode, score pairing, and the --runner / --convert / --task flags.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tiny_pooling import MINILM, build_decoder, build_encoder, set_config

TOL = 1e-4
TEXTS = ["Hi", "The quick brown fox jumps over the lazy dog.",
         "Paged attention keeps the KV cache in fixed-size blocks so that memory is not wasted. " * 3]
QUERY = "what keeps the kv cache small"
DOCS = ["bananas are yellow", "paged attention stores the kv cache in blocks",
        "the quick brown fox", "memory is not wasted with fixed-size blocks"]


def _vec(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().float().flatten()
    return torch.tensor(np.array(x, dtype=np.float32)).flatten()


def close(ours, ref, tol: float = TOL) -> None:
    ours, ref = _vec(ours), _vec(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert (ours - ref).abs().max().item() < tol, (ours, ref)


@pytest.fixture(scope="module")
def bert_tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MINILM)


def hf_model(path: str, cls_name: str):
    import transformers
    return getattr(transformers, cls_name).from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model, enc: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: torch.tensor([v]) for k, v in enc.items()}).logits[0]


def probs_of(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if logits.numel() == 1 else torch.softmax(logits, -1)


# ------------------------------------------------------------------------------ cross-encoders

@pytest.fixture(scope="module")
def bert_reranker(tmp_path_factory) -> str:
    return build_encoder("bert", str(tmp_path_factory.mktemp("bert-rerank")), num_labels=1, seed=1)


@pytest.fixture(scope="module")
def bert_reranker_llm(bert_reranker):
    from pagoda import LLM
    return LLM(bert_reranker)


def test_bert_cross_encoder_scores_pairs_with_token_types(bert_reranker, bert_reranker_llm, bert_tok):
    hf = hf_model(bert_reranker, "BertForSequenceClassification")
    mc = bert_reranker_llm.llm_engine.model_config
    assert (mc.pooling_kind, mc.num_labels, mc.uses_token_type_ids) == ("classify", 1, True)
    assert mc.supported_tasks == ("classify", "encode", "score")
    outs = bert_reranker_llm.score(QUERY, DOCS)
    assert len(outs) == len(DOCS)
    for doc, out in zip(DOCS, outs):
        enc = bert_tok(QUERY, doc)
        assert 1 in enc["token_type_ids"]  # the second segment has its own type
        assert out.prompt_token_ids == enc["input_ids"]
        close([out.outputs.score], torch.sigmoid(hf_logits(hf, dict(enc))))
    # the token types matter: the same ids as one segment score differently
    enc = bert_tok(QUERY, DOCS[1])
    flat = hf_logits(hf, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    assert abs(torch.sigmoid(flat).item() - outs[1].outputs.score) > 1e-3


def test_score_pairing_modes(bert_reranker_llm):
    llm = bert_reranker_llm
    one_n = [o.outputs.score for o in llm.score(QUERY, DOCS)]
    one_one = llm.score(QUERY, DOCS[2])
    assert len(one_one) == 1 and one_one[0].outputs.score == pytest.approx(one_n[2], abs=1e-6)
    n_n = [o.outputs.score for o in llm.score([QUERY, DOCS[0]], [DOCS[1], DOCS[3]])]
    assert n_n[0] == pytest.approx(one_n[1], abs=1e-6)
    assert n_n[1] == pytest.approx(llm.score(DOCS[0], DOCS[3])[0].outputs.score, abs=1e-6)
    assert len(llm.score([QUERY], DOCS)) == len(DOCS)  # a one-item list is one text_1
    with pytest.raises(ValueError, match="data_2: 3 texts for 2 in data_1"):
        llm.score([QUERY, DOCS[0]], DOCS[:3])
    with pytest.raises(ValueError, match="data_2: item 1 is empty"):
        llm.score(QUERY, ["a", ""])
    with pytest.raises(ValueError, match="data_1: must be a non-empty"):
        llm.score([], DOCS)


def test_bert_classifier_probabilities_logits_and_truncation(tmp_path, bert_tok):
    from pagoda import LLM, PoolingParams
    path = build_encoder("bert", str(tmp_path / "cls"), num_labels=3, seed=2)
    hf = hf_model(path, "BertForSequenceClassification")
    llm = LLM(path)
    assert llm.llm_engine.model_config.id2label == {0: "class_a", 1: "class_b", 2: "class_c"}
    outs = llm.classify(TEXTS)  # one step, inputs of unequal length
    for text, out in zip(TEXTS, outs):
        ref = hf_logits(hf, dict(bert_tok(text)))
        close(out.outputs.probs, torch.softmax(ref, -1))
        assert out.outputs.num_classes == 3
    raw = llm.encode(TEXTS[1])[0].outputs.data  # encode: the head's logits
    close(raw, hf_logits(hf, dict(bert_tok(TEXTS[1]))))
    no_act = llm.classify(TEXTS[1], pooling_params=PoolingParams(activation=False))[0]
    close(no_act.outputs.probs, raw)
    ids = bert_tok(TEXTS[2])["input_ids"]
    cut = llm.classify(TEXTS[2], truncate_prompt_tokens=7)[0]  # vLLM: the last 7 tokens
    assert cut.prompt_token_ids == ids[-7:]
    close(cut.outputs.probs, torch.softmax(hf_logits(hf, {"input_ids": ids[-7:]}), -1))
    with pytest.raises(ValueError, match="task: .* does not serve 'score' .*one label"):
        llm.score("a", "b")
    with pytest.raises(ValueError, match="task: .* does not serve 'embed'"):
        llm.embed("a")
    with pytest.raises(ValueError, match="truncate_prompt_tokens: 600 is greater than max_model_len"):
        llm.classify("a", truncate_prompt_tokens=600)


@pytest.mark.parametrize("kind, cls_name", [("xlm-roberta", "XLMRobertaForSequenceClassification"),
                                            ("roberta", "RobertaForSequenceClassification")])
def test_roberta_family_cross_encoder(tmp_path, bert_tok, kind, cls_name):
    """bge-reranker-v2-m3's shape: positions from padding_idx + 1, `classifier.dense/out_proj`."""
    from pagoda import LLM
    path = build_encoder(kind, str(tmp_path / kind), num_labels=1, seed=3)
    hf = hf_model(path, cls_name)
    llm = LLM(path)
    mc = llm.llm_engine.model_config
    assert mc.max_model_len == 129 and not mc.uses_token_type_ids  # 130 positions - (padding_idx 0 + 1)
    for doc, out in zip(DOCS, llm.score(QUERY, DOCS)):
        enc = bert_tok(QUERY, doc)
        close([out.outputs.score], torch.sigmoid(hf_logits(hf, {"input_ids": enc["input_ids"]})))
    ranked = [o.outputs.score for o in llm.score(QUERY, DOCS)]
    assert len(set(np.round(ranked, 4))) == len(DOCS)  # distinct scores: an ordering to test


# ------------------------------------------------------------------------------ encoders

@pytest.mark.parametrize("kind, cls_name", [("roberta", "RobertaModel"), ("xlm-roberta", "XLMRobertaModel")])
def test_roberta_family_embeddings(tmp_path, bert_tok, kind, cls_name):
    from pagoda import LLM
    path = build_encoder(kind, str(tmp_path / kind), seed=4)
    hf = hf_model(path, cls_name)
    llm = LLM(path)
    pad = bert_tok.pad_token_id
    ids = [bert_tok(t)["input_ids"] for t in TEXTS]
    ids.append(ids[1][:4] + [pad, pad] + ids[1][4:])  # padding tokens inside: RoBERTa's positions skip them
    outs = llm.embed([{"prompt_token_ids": x} for x in ids])
    for x, out in zip(ids, outs):
        with torch.no_grad():
            h = hf(input_ids=torch.tensor([x])).last_hidden_state[0]
        close(out.outputs.embedding, F.normalize(h.mean(0), dim=-1))  # no modules.json: mean, normalized


def test_xlm_roberta_cls_embeddings_from_sentence_transformers_files(tmp_path, bert_tok):
    """bge-m3's recipe: CLS pooling + Normalize, read from modules.json."""
    from pagoda import LLM
    path = tmp_path / "xlmr-cls"
    build_encoder("xlm-roberta", str(path), seed=5)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    hf = hf_model(str(path), "XLMRobertaModel")
    for text, out in zip(TEXTS, LLM(str(path)).embed(TEXTS)):
        with torch.no_grad():
            h = hf(input_ids=torch.tensor([bert_tok(text)["input_ids"]])).last_hidden_state[0, 0]
        close(out.outputs.embedding, F.normalize(h, dim=-1))


def test_bi_encoder_score_is_the_cosine_of_embeddings(tmp_path):
    from pagoda import LLM
    llm = LLM(build_encoder("roberta", str(tmp_path / "bi"), seed=6))
    emb = {t: np.asarray(o.outputs.embedding) for t, o in zip([QUERY] + DOCS, llm.embed([QUERY] + DOCS))}
    outs = llm.score(QUERY, DOCS)
    for doc, out in zip(DOCS, outs):
        a, b = emb[QUERY], emb[doc]
        assert out.outputs.score == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-5)
    assert outs[0].prompt_token_ids[:len(llm.get_tokenizer()(QUERY).input_ids)] == \
        llm.get_tokenizer()(QUERY).input_ids


# ------------------------------------------------------------------------------ decoders

@pytest.fixture(scope="module")
def qwen3_embed_dir(tmp_path_factory, smollm_side_dir) -> str:
    from conftest import build_tiny
    path = build_tiny("qwen3", str(tmp_path_factory.mktemp("qwen3-embed")), smollm_side_dir, seed=7)
    set_config(path, matryoshka_dimensions=[16, 32])
    return path


def last_hidden(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]


def test_qwen3_as_embedding_model_last_token_on_the_kv_cache(qwen3_embed_dir):
    """Qwen3-Embedding: --runner pooling on a Qwen3ForCausalLM; the last token's final hidden
    state, normalized; prefix caching and chunked prefill apply as for generation."""
    from pagoda import LLM, PoolingParams
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(qwen3_embed_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(qwen3_embed_dir)
    llm = LLM(qwen3_embed_dir, runner="pooling", max_model_len=512, max_num_batched_tokens=32,
              num_gpu_blocks_override=64)
    core = llm.llm_engine.core
    mc = llm.llm_engine.model_config
    assert (mc.pooling_kind, mc.embedding_size, mc.matryoshka_dimensions) == ("embed", 64, [16, 32])
    assert core.kv_cache_manager.num_blocks == 64  # decoders pool on the paged KV cache
    ids = [tok(t).input_ids for t in TEXTS]
    assert len(ids[2]) > 32  # longer than the step's token budget: prefilled in chunks
    for x, out in zip(ids, llm.embed(TEXTS)):
        close(out.outputs.embedding, F.normalize(last_hidden(hf, x), dim=-1))
    hits = core.kv_cache_manager.hits
    again = llm.embed(TEXTS[2])[0]
    assert core.kv_cache_manager.hits - hits >= 16  # the long prompt's full blocks were cached
    close(again.outputs.embedding, F.normalize(last_hidden(hf, ids[2]), dim=-1))
    # Matryoshka: the first 16 values, normalized
    m = llm.embed(TEXTS[1], pooling_params=PoolingParams(dimensions=16))[0]
    close(m.outputs.embedding, F.normalize(last_hidden(hf, ids[1])[:16], dim=-1))
    raw = llm.encode(TEXTS[1], PoolingParams(normalize=False))[0].outputs.data
    close(raw, last_hidden(hf, ids[1]))
    with pytest.raises(ValueError, match=r"dimensions: 20 is not one of .*\[16, 32\]"):
        llm.embed("a", pooling_params=PoolingParams(dimensions=20))
    with pytest.raises(ValueError, match="generate"):
        llm.generate("hello")


@pytest.mark.parametrize("kind, cls_name", [("qwen3", "Qwen3Model"), ("qwen2", "Qwen2Model"),
                                            ("llama", "LlamaModel")])
def test_bare_decoder_checkpoints_embed_without_flags(tmp_path, smollm_side_dir, kind, cls_name):
    """Embedding checkpoints saved as the bare ...Model (no LM head, no `model.` prefix)."""
    from pagoda import LLM
    from transformers import AutoTokenizer
    path = build_decoder(kind, str(tmp_path / kind), smollm_side_dir, seed=11)
    hf = hf_model(path, cls_name)
    tok = AutoTokenizer.from_pretrained(path)
    llm = LLM(path, max_model_len=256, num_gpu_blocks_override=32)
    assert llm.llm_engine.model_config.pooling_kind == "embed"
    for text, out in zip(TEXTS, llm.embed(TEXTS)):
        with torch.no_grad():
            h = hf(input_ids=torch.tensor([tok(text).input_ids])).last_hidden_state[0, -1]
        close(out.outputs.embedding, F.normalize(h, dim=-1))


def test_models_without_matryoshka_refuse_other_dimensions(tmp_path):
    from pagoda import LLM, PoolingParams
    llm = LLM(build_encoder("roberta", str(tmp_path / "r"), seed=8))
    assert len(llm.embed("a", pooling_params=PoolingParams(dimensions=64))[0].outputs.embedding) == 64
    with pytest.raises(ValueError, match="does not support Matryoshka"):
        llm.embed("a", pooling_params=PoolingParams(dimensions=16))


@pytest.mark.parametrize("kind, cls_name, labels", [
    ("qwen2", "Qwen2ForSequenceClassification", 3),
    ("qwen3", "Qwen3ForSequenceClassification", 1),
    ("llama", "LlamaForSequenceClassification", 2),
])
def test_decoder_sequence_classifiers(tmp_path, smollm_side_dir, kind, cls_name, labels):
    """The `score` head on the last token, as transformers' ...ForSequenceClassification."""
    from pagoda import LLM
    from transformers import AutoTokenizer
    path = build_decoder(kind, str(tmp_path / kind), smollm_side_dir, labels, seed=9)
    hf = hf_model(path, cls_name)
    tok = AutoTokenizer.from_pretrained(path)
    llm = LLM(path, max_model_len=512, num_gpu_blocks_override=64, max_num_batched_tokens=24)
    assert llm.llm_engine.model_config.supported_tasks[:2] == ("classify", "encode")
    for text, out in zip(TEXTS, llm.classify(TEXTS)):
        close(out.outputs.probs, probs_of(hf_logits(hf, {"input_ids": tok(text).input_ids})))
    if labels == 1:  # a decoder reranker: the pair is the two texts back to back
        for doc, out in zip(DOCS, llm.score(QUERY, DOCS)):
            ids = tok(QUERY, doc).input_ids
            close([out.outputs.score], torch.sigmoid(hf_logits(hf, {"input_ids": ids})))


def test_convert_classify_reads_the_score_head_of_a_causal_lm_checkpoint(tmp_path, smollm_side_dir):
    from pagoda import LLM
    from transformers import AutoTokenizer
    path = build_decoder("qwen3", str(tmp_path / "q"), smollm_side_dir, 2, seed=10)
    hf = hf_model(path, "Qwen3ForSequenceClassification")
    set_config(path, architectures=["Qwen3ForCausalLM"])  # a fine-tune saved under the LM's name
    tok = AutoTokenizer.from_pretrained(path)
    llm = LLM(path, convert="classify", runner="pooling", max_model_len=256, num_gpu_blocks_override=32)
    out = llm.classify(TEXTS[1])[0]
    close(out.outputs.probs, torch.softmax(hf_logits(hf, {"input_ids": tok(TEXTS[1]).input_ids}), -1))


def test_convert_classify_without_a_score_head_is_refused(tiny_qwen3_dir):
    from pagoda import LLM
    with pytest.raises(ValueError, match=r"missing .*score\.weight"):
        LLM(tiny_qwen3_dir, convert="classify", max_model_len=256, num_gpu_blocks_override=32)


# ------------------------------------------------------------------------------ flags

def test_runner_convert_and_task_flags(bert_reranker):
    from pagoda.config import EngineArgs, engine_flags
    names = {f.name for f in engine_flags()}
    assert {"runner", "convert", "task"} <= names
    a = EngineArgs(task="embed")
    assert (a.runner, a.convert) == ("pooling", "embed")
    assert (EngineArgs(task="score").runner, EngineArgs(task="score").convert) == ("pooling", "auto")
    assert EngineArgs(task="generate").runner == "generate"
    with pytest.raises(ValueError, match="--task embed means --runner pooling, but --runner generate"):
        EngineArgs(task="embed", runner="generate")
    with pytest.raises(ValueError, match="--convert: embed makes a pooling model"):
        EngineArgs(runner="generate", convert="embed")
    with pytest.raises(ValueError, match="--runner"):
        EngineArgs(runner="nope")


def test_pooling_model_resolution(bert_reranker, tiny_qwen3_dir):
    from transformers import AutoConfig
    from pagoda.models.registry import pooling_model
    qwen, bert = AutoConfig.from_pretrained(tiny_qwen3_dir), AutoConfig.from_pretrained(bert_reranker)
    assert pooling_model(qwen) is None  # a ForCausalLM generates unless told otherwise
    assert pooling_model(qwen, runner="pooling").kind == "embed"
    assert pooling_model(qwen, convert="embed").decoder
    assert pooling_model(qwen, convert="classify").kind == "classify"
    assert pooling_model(bert).kind == "classify" and not pooling_model(bert).decoder
    with pytest.raises(ValueError, match="--runner: BertForSequenceClassification is a pooling model"):
        pooling_model(bert, runner="generate")
    with pytest.raises(ValueError, match="--runner pooling: Qwen3ForCausalLM generates text"):
        pooling_model(qwen, runner="pooling", convert="none")
    with pytest.raises(ValueError, match="--convert: BertModel has no classification head"):
        pooling_model(AutoConfig.from_pretrained(MINILM), convert="classify")
