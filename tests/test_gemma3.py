"""Gemma 3 against transformers on tiny random checkpoints (fp32, CPU): sliding and global layers
with prompts several windows long, batched, chunked and with prefix-cache hits; soft caps; the
text part of Gemma3ForConditionalGeneration; a llama.cpp-style GGUF."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import TINY_WINDOW, build_tiny, random_prompts
from pagoda import LLM
from test_fidelity import _greedy_matches, check_sliding_window

# Gemma 3 as released (no soft caps), with final logit soft-capping (Gemma 2's 30.0), and with
# attn_logit_softcapping set, which Gemma 3 ignores (transformers' Gemma 3 attention does not
# pass it on; llama.cpp's converter refuses it)
VARIANTS = {
    "plain": {},
    "final-softcap": {"final_logit_softcapping": 30.0},
    "attn-softcap": {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 4.0},
}


def _hf(model_dir, **kw):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gemma3_matches_transformers(variant, tiny_gemma3_dir, tmp_path, smollm_side_dir):
    model_dir = tiny_gemma3_dir if variant == "plain" else build_tiny(
        "gemma3", str(tmp_path / variant), smollm_side_dir, seed=1, **VARIANTS[variant])
    hf = _hf(model_dir, attn_implementation="eager")
    assert set(hf.config.layer_types) == {"sliding_attention", "full_attention"}
    assert hf.config.sliding_window == TINY_WINDOW
    check_sliding_window(model_dir, hf)


def test_gemma3_layers_are_built_as_configured(tiny_gemma3_dir):
    """The structure behind the fidelity: windows and rotary bases per layer type, the
    attention scale from query_pre_attn_scalar, the embedding scale, tied embeddings."""
    llm = LLM(tiny_gemma3_dir, max_model_len=256, num_gpu_blocks_override=32)
    model = llm.llm_engine.core.worker.model
    attn = model.attention_layers()
    assert [a.sliding_window for a in attn] == [TINY_WINDOW, None, TINY_WINDOW]
    assert all(abs(a.scale - 24 ** -0.5) < 1e-12 for a in attn)
    local, glob = model.layers[0].self_attn.rotary, model.layers[1].self_attn.rotary
    assert model.layers[2].self_attn.rotary is local and local is not glob
    # position 1, lowest frequency pair: 1 / base ** ((d - 2) / d), the global one / factor 2
    lo = 1 / 10_000.0 ** (30 / 32)
    gl = 1 / 1_000_000.0 ** (30 / 32) / 2
    assert abs(local.cos_sin_cache[1, 15].item() - torch.tensor(lo).cos().item()) < 1e-6
    assert abs(glob.cos_sin_cache[1, 31].item() - torch.tensor(gl).sin().item()) < 1e-9
    assert model.embed_scale == 8.0 and model.lm_head.tied


def test_gemma3_for_conditional_generation_loads_text_only(tmp_path, smollm_side_dir):
    """A Gemma3ForConditionalGeneration checkpoint (vision tower + projector + language model)
    runs as text in, text out, against transformers' composite model given text only, from
    either layout of its names."""
    from safetensors.torch import load_file, save_file
    from transformers import (AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration,
                              Gemma3TextConfig, SiglipVisionConfig)
    # no final soft cap: transformers' composite model never applies one (its text model does)
    text_dir = build_tiny("gemma3", str(tmp_path / "text"), smollm_side_dir, seed=2)
    text_cfg = Gemma3TextConfig.from_pretrained(text_dir)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    vocab = text_cfg.vocab_size
    cfg = Gemma3Config(text_config=text_cfg.to_dict(), vision_config=vision.to_dict(),
                       mm_tokens_per_image=4, image_token_index=vocab - 1,
                       boi_token_index=vocab - 2, eoi_token_index=vocab - 3)
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    torch.manual_seed(2)
    hf = Gemma3ForConditionalGeneration(cfg).eval()
    text = _hf(text_dir)
    with torch.no_grad():  # the text model's weights, a random vision tower beside them
        missing = hf.model.language_model.load_state_dict(text.model.state_dict())
        assert not missing.missing_keys and not missing.unexpected_keys
        hf.model.multi_modal_projector.mm_input_projection_weight.normal_()
    saved = str(tmp_path / "composite")
    hf.save_pretrained(saved)
    AutoTokenizer.from_pretrained(smollm_side_dir).save_pretrained(saved)
    weights = load_file(os.path.join(saved, "model.safetensors"))
    assert any(n.startswith(("vision_tower.", "model.vision_tower.")) for n in weights)

    prompts = random_prompts(3, 3 * TINY_WINDOW, 5 * TINY_WINDOW, vocab, seed=3)
    llm = LLM(saved, max_model_len=512)
    assert type(llm.llm_engine.core.worker.model).__name__.startswith("Gemma3")
    _greedy_matches(hf, llm, prompts)

    # the other of the two layouts (hub: language_model.model.*, vision_tower.*;
    # transformers 5 in memory: model.language_model.*, model.vision_tower.*)
    hub = {"language_model.model.": "model.language_model.", "vision_tower.": "model.vision_tower.",
           "multi_modal_projector.": "model.multi_modal_projector."}
    if not any(n.startswith("language_model.model.") for n in weights):
        hub = {new: old for old, new in hub.items()}
    other = tmp_path / "composite-other-layout"
    other.mkdir()
    renamed = {}
    for name, t in weights.items():
        old = next((o for o in hub if name.startswith(o)), None)
        assert old is not None, name
        renamed[hub[old] + name[len(old):]] = t
    save_file(renamed, str(other / "model.safetensors"))
    for f in os.listdir(saved):
        if not f.endswith(".safetensors"):
            os.link(os.path.join(saved, f), other / f)
    _greedy_matches(hf, LLM(str(other), max_model_len=512), prompts)


def _write_gemma3_gguf(model_dir: str, tokenizer_dir: str, path: str) -> None:
    """The checkpoint as llama.cpp's converter writes it: gguf's gemma3 tensor names, F32, every
    RMSNorm weight stored with Gemma's + 1 added; a byte-level BPE vocabulary."""
    import gguf
    from safetensors.torch import load_file
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_name("tiny-gemma3")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["full_attention"]["rope_theta"])
    w.add_sliding_window(cfg["sliding_window"])
    tok = json.load(open(os.path.join(tokenizer_dir, "tokenizer.json")))
    vocab = dict(tok["model"]["vocab"])
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    specials = {a["id"] for a in tok["added_tokens"] if a.get("special")}
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg["num_hidden_layers"])
    for name, t in load_file(os.path.join(model_dir, "model.safetensors")).items():
        if name.endswith("norm.weight"):
            t = t + 1
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gemma3_gguf_matches_transformers(tmp_path, smollm_side_dir):
    """A gemma3 GGUF written from a tiny checkpoint: our loader (gguf names, the +1 taken off
    the norms) gives the original model's outputs, and transformers' GGUF loader agrees.
    The model keeps to what GGUF metadata carries (llama.cpp and transformers fix the rest:
    sliding_window_pattern 6, rope_local_base_freq 10000, query_pre_attn_scalar 256)."""
    model_dir = build_tiny("gemma3", str(tmp_path / "hf"), smollm_side_dir, seed=4,
                           num_hidden_layers=6, sliding_window_pattern=6,
                           query_pre_attn_scalar=256, rope_scaling=None)
    path = str(tmp_path / "tiny-gemma3.gguf")
    _write_gemma3_gguf(model_dir, smollm_side_dir, path)
    original = _hf(model_dir)
    assert original.config.layer_types.count("full_attention") == 1
    from_gguf = _hf(str(tmp_path), gguf_file=os.path.basename(path))
    for name, p in original.state_dict().items():  # transformers reads the file back exactly
        torch.testing.assert_close(from_gguf.state_dict()[name], p, atol=1e-6, rtol=0)
    llm = LLM(path, max_model_len=512)
    assert llm.llm_engine.core.worker.quantization == "none"
    prompts = random_prompts(4, 3 * TINY_WINDOW, 6 * TINY_WINDOW, 49152, seed=5)
    _greedy_matches(original, llm, prompts)
    _greedy_matches(from_gguf, llm, prompts)


def test_gemma3_refuses_bidirectional_attention(tmp_path, smollm_side_dir):
    model_dir = build_tiny("gemma3", str(tmp_path / "bidi"), smollm_side_dir,
                           use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="bidirectional"):
        LLM(model_dir, max_model_len=256)
