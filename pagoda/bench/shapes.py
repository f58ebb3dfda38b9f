"""Random-weight models of standard shapes, so throughput can be measured without a download.

The shapes are the ones the project's GPU workload (W1) names; ``tiny-llama`` is small enough
for CPU tests. pagoda loads them from a directory holding only config.json with
``load_format="dummy"``; the Hugging Face baseline builds the same config with random weights.
"""
from __future__ import annotations

import os
import tempfile

SHAPES: dict[str, dict] = {
    "qwen3-0.6b": dict(arch="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1e6),
    "llama3-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=5e5),
    # vocabulary of the bundled SmolLM2 tokenizer, so text workloads work with --tokenizer
    "tiny-llama": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                       tie_word_embeddings=False, max_position_embeddings=2048, rope_theta=1e4),
}


def make_config(name: str):
    """The transformers config of a named shape, with no EOS (generation always runs to length)."""
    if name not in SHAPES:
        raise ValueError(f"--model-shape: unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    from transformers import LlamaConfig, Qwen3Config
    spec = dict(SHAPES[name])
    arch = spec.pop("arch")
    cfg = (Qwen3Config if arch == "qwen3" else LlamaConfig)(**spec)
    cfg.eos_token_id = None
    cfg.bos_token_id = None
    cfg.pad_token_id = 0
    return cfg


def write_model_dir(name: str, parent: str | None = None) -> str:
    """A fresh directory with the shape's config.json, for pagoda's dummy-weight loader."""
    path = tempfile.mkdtemp(prefix=f"pagoda-{name}-", dir=parent)
    make_config(name).save_pretrained(path)
    return path


def build_hf_model(name: str, dtype, device: str, seed: int = 0):
    """The shape as a transformers model, weights ~ N(0, 0.02) like the reference baseline."""
    import torch
    from transformers import AutoModelForCausalLM
    cfg = make_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def cleanup_model_dir(path: str) -> None:
    for f in os.listdir(path):
        os.remove(os.path.join(path, f))
    os.rmdir(path)
