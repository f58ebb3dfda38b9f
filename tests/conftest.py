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


@pytest.fixture(scope="session")
def smollm_side_dir() -> str:
    """Config + tokenizer of the bundled SmolLM2 GGUF, converted once (HF format)."""
    from pagoda.worker.loader import _gguf_side_dir, bundled_model_path
    return _gguf_side_dir(bundled_model_path())


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6)


def build_tiny(kind: str, path: str, tokenizer_dir: str, seed: int = 0) -> str:
    """A random-weight HF checkpoint (safetensors + tokenizer) of a tiny model of `kind`.
    Weights are drawn wide enough that greedy choices are not near-ties."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config, Qwen3Config
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(TINY, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if kind == "llama":
        cfg = LlamaConfig(**common, max_position_embeddings=4096, tie_word_embeddings=False,
                          rope_theta=50000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})
    elif kind == "qwen3":
        cfg = Qwen3Config(**common, head_dim=32, max_position_embeddings=4096, tie_word_embeddings=True)
    elif kind == "qwen2":
        cfg = Qwen2Config(**common, max_position_embeddings=4096, tie_word_embeddings=False)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "bias" in name:
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.15)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm_side_dir) -> str:
    return build_tiny("llama", str(tmp_path_factory.mktemp("tiny-llama")), smollm_side_dir)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, smollm_side_dir) -> str:
    return build_tiny("qwen3", str(tmp_path_factory.mktemp("tiny-qwen3")), smollm_side_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, smollm_side_dir) -> str:
    return build_tiny("qwen2", str(tmp_path_factory.mktemp("tiny-qwen2")), smollm_side_dir)


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_dir):
    """One engine on the tiny Llama shared by tests that only need *a* model."""
    from pagoda import LLM
    return LLM(tiny_llama_dir, max_model_len=1024, num_gpu_blocks_override=512)


@pytest.fixture(scope="session")
def bundled_llm():
    """The bundled model as users get it: on the CPU its Q4_1/Q8_0 weights run as 8-bit groups."""
    from pagoda import LLM
    return LLM(max_model_len=2048)


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
