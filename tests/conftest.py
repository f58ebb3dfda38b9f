"""Shared fixtures: tiny random-weight checkpoints (built here, HF format, with the bundled
SmolLM2 tokenizer) and the bundled model's converted tokenizer/config.

PAGODA_CACHE_DIR points at a fresh folder per test run, so the GGUF tokenizer conversion is done
(and tested) once per run and reused by every test and server subprocess of that run.
"""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("PAGODA_CACHE_DIR", tempfile.mkdtemp(prefix="pagoda-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter here. The mode is fixed when a kernel is decorated,
    # so it must be set before any test module imports pagoda's Triton kernels (a GPU test module
    # collected first would otherwise leave compiled-mode helpers that interpreted kernels call).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm_side_dir() -> str:
    """Config + tokenizer of the bundled SmolLM2 GGUF, converted once (HF format)."""
    from pagoda.worker.loader import _gguf_side_dir, bundled_model_path
    return _gguf_side_dir(bundled_model_path())


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6)


# sliding window of the tiny Mistral / Gemma 3: prompts of tests are several windows long
TINY_WINDOW = 8


def build_tiny(kind: str, path: str, tokenizer_dir: str, seed: int = 0, **overrides) -> str:
    """A random-weight HF checkpoint (safetensors + tokenizer) of a tiny model of `kind`
    (`overrides` go to its config). Weights are drawn wide enough that greedy choices are not
    near-ties."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig,
                              MistralConfig, Qwen2Config, Qwen3Config)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(TINY, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    common.update(overrides)
    if kind == "llama":
        cfg = LlamaConfig(**common, max_position_embeddings=4096, tie_word_embeddings=False,
                          rope_theta=50000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})
    elif kind == "qwen3":
        cfg = Qwen3Config(**common, head_dim=32, max_position_embeddings=4096, tie_word_embeddings=True)
    elif kind == "qwen2":
        cfg = Qwen2Config(**common, max_position_embeddings=4096, tie_word_embeddings=False)
    elif kind == "mistral":
        cfg = MistralConfig(**common, max_position_embeddings=4096,
                            tie_word_embeddings=False, sliding_window=TINY_WINDOW)
    elif kind == "gemma3":
        # 3 layers: sliding, global, sliding; head_dim and query_pre_attn_scalar differ from
        # hidden / heads; linear rope scaling on the global layer only, as Gemma 3 4B+ has
        args = dict(common, num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=24,
                    sliding_window=TINY_WINDOW, sliding_window_pattern=2,
                    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                    rope_scaling={"rope_type": "linear", "factor": 2.0},
                    max_position_embeddings=4096, pad_token_id=0)
        args.update(overrides)
        cfg = Gemma3TextConfig(**args)
        cfg.architectures = ["Gemma3ForCausalLM"]
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's (1 + weight) norms hold the offset from 1
                p.copy_((0.0 if kind == "gemma3" else 1.0) + 0.1 * torch.randn_like(p))
            elif "bias" in name:
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.15)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def random_blocks(ggml_type: int, n: int, k: int, seed: int = 0, scale: float = 1.0):
    """Rows [n, row_bytes] (uint8 tensor) of valid GGUF blocks: the gguf package's quantizer of
    random normals where it has one (the 32-weight types), else random bytes with small finite
    half-precision scales (the K types: 256 weights a block)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize
    rng = np.random.default_rng(seed)
    per, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    if per == 32:
        w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.1, 2.0, (n, 1)) * scale
        return torch.from_numpy(quantize(w, GGMLQuantizationType(ggml_type)).copy())
    b = rng.integers(0, 256, (n, k // per, size), dtype=np.uint8)
    d = lambda s: (rng.uniform(1e-3, 2e-2, (n, k // per)) * s).astype(np.float16).view(
        np.uint8).reshape(n, k // per, 2)
    if ggml_type in (12, 13):  # Q4_K, Q5_K: d, dmin first (mins a tenth: rows about centred)
        b[..., 0:2], b[..., 2:4] = d(scale), d(scale / 10)
    else:  # Q6_K: d last
        b[..., size - 2:] = d(scale)
    return torch.from_numpy(b.reshape(n, -1).copy())


def build_tiny_gguf(hf_dir: str, path: str, types: dict[str, str]) -> str:
    """The tiny Llama of `hf_dir` written as a llama.cpp GGUF (q/k rows permuted as llama.cpp's
    converter does, the bundled model's tokenizer), each matrix quantized to types[base name]
    ("Q4_0", "Q4_1", "Q8_0", ...; F32 where not named) by the gguf package; K types, which it
    cannot quantize, get random blocks of about the checkpoint's scale instead. Plain rope (the
    GGUF carries no llama3 scaling), so it is its own model: compare it with transformers' GGUF
    loader."""
    import json
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
    from gguf.quants import quantize
    from safetensors.numpy import load_file
    from pagoda.worker.loader import _GGUF_NAMES, bundled_model_path
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hf = load_file(os.path.join(hf_dir, "model.safetensors"))
    to_gguf = {v: k for k, v in _GGUF_NAMES.items()}
    w = GGUFWriter(path, "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    f = GGUFReader(bundled_model_path()).fields
    w.add_tokenizer_model(str(f["tokenizer.ggml.model"].contents()))
    w.add_tokenizer_pre(str(f["tokenizer.ggml.pre"].contents()))
    w.add_token_list(f["tokenizer.ggml.tokens"].contents())
    w.add_token_types(f["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(f["tokenizer.ggml.merges"].contents())
    for key in ("bos", "eos", "unknown", "padding"):
        getattr(w, {"unknown": "add_unk_token_id", "padding": "add_pad_token_id"}.get(
            key, f"add_{key}_token_id"))(int(f[f"tokenizer.ggml.{key}_token_id"].contents()))
    for name, t in sorted(hf.items()):
        parts = name.removeprefix("model.").split(".")
        if parts[0] == "layers":
            base = to_gguf[".".join(parts[2:-1])]
            gname = f"blk.{parts[1]}.{base}.{parts[-1]}"
        else:
            base = to_gguf[("model." if parts[0] != "lm_head" else "") + ".".join(parts[:-1])]
            gname = f"{base}.{parts[-1]}"
        t = t.astype(np.float32)
        if base in ("attn_q", "attn_k"):  # llama.cpp's rotary layout (what the loader undoes)
            n = heads if base == "attn_q" else kv
            t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        qtype = types.get(base) if t.ndim == 2 else None
        if qtype and qtype.endswith("_K"):
            q = GGMLQuantizationType[qtype]
            blocks = random_blocks(int(q), *t.shape, seed=len(gname), scale=0.01).numpy()
            w.add_tensor(gname, blocks, raw_dtype=q)
        elif qtype:
            q = GGMLQuantizationType[qtype]
            w.add_tensor(gname, quantize(t, q), raw_dtype=q)
        else:
            w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny_dir_fixture(kind: str, vision: bool = False):
    """A session fixture: the path of build_tiny(kind)'s checkpoint (vision-language ones:
    vlm_utils.build_tiny_vlm's), built once per run."""
    @pytest.fixture(scope="session")
    def tiny_dir(tmp_path_factory, smollm_side_dir) -> str:
        if vision:
            from vlm_utils import build_tiny_vlm as build
        else:
            build = build_tiny
        return build(kind, str(tmp_path_factory.mktemp(f"tiny-{kind}")), smollm_side_dir)
    return tiny_dir


tiny_llama_dir = _tiny_dir_fixture("llama")
tiny_qwen3_dir = _tiny_dir_fixture("qwen3")
tiny_qwen2_dir = _tiny_dir_fixture("qwen2")
tiny_mistral_dir = _tiny_dir_fixture("mistral")
tiny_gemma3_dir = _tiny_dir_fixture("gemma3")
# vision-language models (tests/vlm_utils.py)
tiny_llava_dir = _tiny_dir_fixture("llava", vision=True)
tiny_qwen2_vl_dir = _tiny_dir_fixture("qwen2_vl", vision=True)
tiny_qwen2_5_vl_dir = _tiny_dir_fixture("qwen2_5_vl", vision=True)
tiny_idefics3_dir = _tiny_dir_fixture("idefics3", vision=True)
tiny_smolvlm_dir = _tiny_dir_fixture("smolvlm", vision=True)


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_dir):
    """One engine on the tiny Llama shared by tests that only need *a* model."""
    from pagoda import LLM
    return LLM(tiny_llama_dir, max_model_len=1024, num_gpu_blocks_override=512)


@pytest.fixture(scope="session")
def bundled_llm():
    """The bundled model as users get it: on the CPU its Q4_1/Q8_0 blocks run packed."""
    from pagoda import LLM
    return LLM(max_model_len=2048)


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def scattered_blocks(lens: list[int], block_size: int, spare: int = 3):
    """Block tables for requests of `lens` tokens over blocks in random order (a few spare),
    and the slot of every token: (num_blocks, block_tables int32, slot_mapping int64)."""
    import torch
    per = [-(-n // block_size) for n in lens]
    nb = sum(per) + spare
    perm = torch.randperm(nb)
    bt = torch.zeros(len(lens), max(per), dtype=torch.int32)
    i = 0
    for r, p in enumerate(per):
        bt[r, :p] = perm[i:i + p]
        i += p
    slots = torch.cat([bt[r].long().repeat_interleave(block_size)[:n] * block_size
                       + torch.arange(n) % block_size for r, n in enumerate(lens)])
    return nb, bt, slots


def assert_same_outputs(got, ref, atol: float = 1e-4):
    """Two runs of the same prompts: equal tokens, and each returned logprob within atol."""
    for a, b in zip(got, ref, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for tok, lp in la.items():
                assert abs(lp.logprob - lb[tok].logprob) < atol


@pytest.fixture(autouse=True)
def _free_cuda_engines():
    """After each test on a CUDA machine, collect finished engines (they hold reference cycles)
    so that the next test's memory plan does not count their KV caches as used."""
    yield
    import sys
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        import gc
        gc.collect()
        torch.cuda.empty_cache()
