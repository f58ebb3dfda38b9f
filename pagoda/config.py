"""EngineArgs: every engine flag, defined once.

Each flag is declared a single time in ``ENGINE_FLAGS``; from there it becomes a field of
``EngineArgs`` (offline API: ``LLM(max_model_len=...)``), a command-line option with vLLM's
name (plus LMDeploy's alias where one means the same), and an environment variable
``PAGODA_<NAME>`` that sets its default (Docker images configure the server that way).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


def _bool(s: str | bool) -> bool:
    if isinstance(s, bool):
        return s
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def parse_bytes(s: str | int | None) -> Optional[int]:
    """'4GiB', '512M', '1e9', 1000 -> bytes."""
    if s is None or isinstance(s, int):
        return s
    t = str(s).strip().lower().replace(" ", "")
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "b": 1}
    for u, mult in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mult)
    return int(float(t))


@dataclass(frozen=True)
class Flag:
    """One command-line flag. ``name`` is the vLLM spelling without dashes."""
    name: str
    type: Callable[[str], Any] | None
    default: Any
    help: str
    group: str = "Model"
    aliases: tuple[str, ...] = ()
    choices: tuple[Any, ...] | None = None
    boolean: bool = False  # --x / --no-x
    nargs: str | None = None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "PAGODA_" + self.dest.upper()


def add_flags(parser: argparse.ArgumentParser, flags: list[Flag], groups: dict[str, Any] | None = None):
    """Add flags to an argparse parser, grouped, with PAGODA_* environment defaults."""
    groups = groups if groups is not None else {}
    for f in flags:
        g = groups.get(f.group)
        if g is None:
            g = groups[f.group] = parser.add_argument_group(f.group)
        default = f.default
        if os.environ.get(f.env, "").strip():  # an empty variable counts as unset
            raw = os.environ[f.env]
            default = _bool(raw) if f.boolean else (f.type(raw) if f.type else raw)
            if f.nargs and not isinstance(default, list):
                default = raw.split()
        names = ["--" + f.name] + [a if a.startswith("-") else "--" + a for a in f.aliases]
        hint = f" (env {f.env})"
        if f.boolean:
            g.add_argument(*names, dest=f.dest, default=default, action=argparse.BooleanOptionalAction,
                           help=f.help + hint)
        else:
            kw: dict[str, Any] = dict(dest=f.dest, default=default, help=f.help + hint)
            if f.type is not None:
                kw["type"] = f.type
            if f.choices:
                kw["choices"] = f.choices
            if f.nargs:
                kw["nargs"] = f.nargs
            g.add_argument(*names, **kw)
    return groups


ENGINE_FLAGS: list[Flag] = [
    Flag("model", str, None, "Model: a local HF-format directory, a .gguf file, or a Hugging Face hub "
         "id. Default: the bundled SmolLM2-135M-Instruct."),
    Flag("tokenizer", str, None, "Tokenizer directory or hub id (default: the model's)."),
    Flag("revision", str, None, "Hub revision (branch, tag or commit) of the model."),
    Flag("trust-remote-code", None, False, "Allow custom code from the hub (configs/tokenizers only; "
         "the model code is pagoda's own).", boolean=True),
    Flag("download-dir", str, None, "Where hub downloads are cached (default: HF_HOME's hub cache)."),
    Flag("dtype", str, "auto", "Weight and activation dtype; auto = bfloat16 on GPU, float32 on CPU.",
         choices=("auto", "float32", "bfloat16", "float16", "half", "float", "fp32", "bf16", "fp16")),
    Flag("quantization", str, None, "Weight quantization. int8: 8-bit weights (CPU: a GGUF's own "
         "4/5/6/8-bit blocks where the file has them, else groups of 32 with a scale and min; CUDA: "
         "weight-only per channel). int4 (CPU only): float weights packed as 4-bit Q4_1 blocks. "
         "Activations stay float. none: weights in --dtype. Default: int8 for a quantized GGUF on "
         "the CPU, else none.", aliases=("-q",), choices=("int8", "int4", "none")),
    Flag("max-model-len", int, None, "Longest prompt + output per request (default: the model's "
         "max_position_embeddings).", aliases=("session-len",)),
    Flag("load-format", str, "auto", "auto = read the checkpoint; dummy = random weights of the "
         "model's shape (benchmarks without downloads).", choices=("auto", "dummy")),
    Flag("skip-tokenizer-init", None, False, "No tokenizer: prompts must be token ids and outputs "
         "carry no text.", boolean=True),
    Flag("seed", int, 0, "Seed for requests that give none."),
    Flag("device", str, "auto", "auto, cpu, cuda or cuda:N (or set CUDA_VISIBLE_DEVICES)."),
    Flag("threads", int, None, "CPU threads for the model (torch and pagoda's C kernels). Default: "
         "OMP_NUM_THREADS if set, else one per physical core this process may use.",
         aliases=("-t",)),
    Flag("max-logprobs", int, 20, "Largest logprobs / top_logprobs a request may ask for."),
    Flag("served-model-name", str, None, "Name(s) the API answers to (default: the model argument). "
         "The first is reported in responses.", nargs="+"),
    # Cache
    Flag("block-size", int, 16, "Tokens per KV-cache block.", group="KV cache",
         aliases=("cache-block-seq-len",)),
    Flag("gpu-memory-utilization", float, 0.9, "Share of GPU memory pagoda may use (weights, "
         "activations and KV cache). Lower it if startup runs out of memory.", group="KV cache",
         aliases=("cache-max-entry-count",)),
    Flag("kv-cache-memory", parse_bytes, None, "KV cache size in bytes (e.g. 2GiB); on CPU the "
         "default is 1 GiB. Overrides --gpu-memory-utilization for the cache.", group="KV cache"),
    Flag("num-gpu-blocks-override", int, None, "Exact number of KV-cache blocks (testing).",
         group="KV cache"),
    Flag("swap-space", float, 4, "Accepted for vLLM compatibility; pagoda preempts by recompute and "
         "does not swap to CPU memory.", group="KV cache"),
    Flag("enable-prefix-caching", None, True, "Reuse KV blocks of shared prompt prefixes.",
         group="KV cache", boolean=True),
    # Scheduler
    Flag("max-num-seqs", int, None, "Most requests in one batch (default 512 on a GPU with 70+ GiB, "
         "256 on smaller GPUs, 64 on CPU).",
         group="Scheduler", aliases=("max-batch-size",)),
    Flag("max-num-batched-tokens", int, None, "Token budget of one step; longer prompts are "
         "prefilled in chunks (default 8192 on GPU, 2048 on CPU).", group="Scheduler",
         aliases=("max-prefill-token-num",)),
    Flag("enforce-eager", None, False, "Disable CUDA graphs.", group="Scheduler", boolean=True),
    Flag("tensor-parallel-size", int, 1, "GPUs to split the model over (only 1 is supported yet).",
         group="Scheduler", aliases=("-tp",)),
    Flag("attention-backend", str, "auto", "auto (triton on CUDA, torch otherwise), torch or triton.",
         group="Scheduler", choices=("auto", "torch", "triton")),
]

_DTYPE_ALIASES = {"half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32",
                  "bf16": "bfloat16"}


@dataclass
class EngineArgs:
    model: Optional[str] = None
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False
    download_dir: Optional[str] = None
    dtype: str = "auto"
    quantization: Optional[str] = None
    max_model_len: Optional[int] = None
    load_format: str = "auto"
    skip_tokenizer_init: bool = False
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    max_logprobs: int = 20
    served_model_name: Optional[list[str]] = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: Optional[int] = None
    num_gpu_blocks_override: Optional[int] = None
    swap_space: float = 4
    enable_prefix_caching: bool = True
    max_num_seqs: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    attention_backend: str = "auto"
    # not a flag: transformers-style overrides used by tests/benchmarks
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        if isinstance(self.served_model_name, str):
            self.served_model_name = [self.served_model_name]
        if isinstance(self.kv_cache_memory, str):
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        self.validate()

    def validate(self):
        def bad(flag, msg):
            raise ValueError(f"--{flag}: {msg}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            bad("dtype", f"unknown dtype {self.dtype!r}; use auto, float32, bfloat16 or float16")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            bad("block-size", f"must be a power of two >= 1, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            bad("gpu-memory-utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            bad("max-model-len", f"must be >= 1, got {self.max_model_len}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            bad("max-num-seqs", f"must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            bad("max-num-batched-tokens", f"must be >= 1, got {self.max_num_batched_tokens}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            bad("num-gpu-blocks-override", f"must be >= 1, got {self.num_gpu_blocks_override}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            bad("kv-cache-memory", f"must be > 0 bytes, got {self.kv_cache_memory}")
        if self.max_logprobs < 0:
            bad("max-logprobs", f"must be >= 0, got {self.max_logprobs}")
        if self.tensor_parallel_size != 1:
            bad("tensor-parallel-size", f"{self.tensor_parallel_size} is not supported yet; pagoda "
                "runs on one device (use 1)")
        if self.quantization not in (None, "int8", "int4", "none"):
            bad("quantization", f"unknown method {self.quantization!r}; supported: int8, int4, none")
        if self.quantization == "int4" and self.device.startswith("cuda"):
            bad("quantization", "int4 runs on the CPU only so far; use int8 or none on CUDA")
        if self.threads is not None and self.threads < 1:
            bad("threads", f"must be >= 1, got {self.threads}")
        if self.load_format not in ("auto", "dummy"):
            bad("load-format", f"unknown format {self.load_format!r}; use auto or dummy")
        if self.attention_backend not in ("auto", "torch", "triton"):
            bad("attention-backend", f"unknown backend {self.attention_backend!r}")

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, groups: dict | None = None,
                     skip: tuple[str, ...] = ()) -> dict:
        return add_flags(parser, [f for f in ENGINE_FLAGS if f.name not in skip], groups)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names and k != "extra"})

    @classmethod
    def from_kwargs(cls, **kw) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(kw) - names
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
        return cls(**kw)


def load_config_file(path: str) -> dict:
    """A YAML (or JSON) file mapping flag names (dashes or underscores) to values."""
    import yaml
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of flag names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}
