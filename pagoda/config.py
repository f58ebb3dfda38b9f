"""EngineArgs: every engine flag, defined once.

Each flag is one field of ``EngineArgs`` declared with ``flag(...)``; from there it is a keyword
of the offline API (``LLM(max_model_len=...)``), a command-line option with vLLM's name (plus
LMDeploy's alias where one means the same, see ``engine_flags()``), and an environment variable
``PAGODA_<NAME>`` that sets its default (Docker images configure the server that way).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import typing
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


def json_dict(s: str | dict | None) -> Optional[dict]:
    """A JSON object given on the command line (vLLM's form: '{"image": 4}')."""
    if s is None or isinstance(s, dict):
        return s
    try:
        value = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {s!r}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"image\": 4}}', got {s!r}")
    return value


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


def flag(default: Any, help: str, *, group: str = "Model", aliases: tuple[str, ...] = (),
         choices: tuple[Any, ...] | None = None, type: Callable[[str], Any] | None = None,
         nargs: str | None = None) -> Any:
    """A dataclass field of EngineArgs that is also a command-line flag (declared once here)."""
    return field(default=default, metadata={"flag": dict(help=help, group=group, aliases=aliases,
                                                         choices=choices, type=type, nargs=nargs)})


STRUCTURED_OUTPUT_BACKENDS = ("auto", "xgrammar")
_STRUCTURED_OUTPUTS_KEYS = {"backend": str, "disable_any_whitespace": bool, "disable_fallback": bool,
                            "disable_additional_properties": bool}


def structured_outputs_config(value: str | dict | None) -> dict:
    """--structured-outputs-config: vLLM's JSON object ('{"backend": "xgrammar"}') or just a
    backend name (what --guided-decoding-backend took)."""
    if value is None or value == "":
        value = {}
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            import json
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise argparse.ArgumentTypeError(f"not a JSON object: {e}")
        else:
            value = {"backend": text}
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    out = {"backend": "auto", "disable_any_whitespace": False}
    for k, v in value.items():
        want = _STRUCTURED_OUTPUTS_KEYS.get(k)
        if want is None:
            raise argparse.ArgumentTypeError(f"unknown key {k!r}; known: {', '.join(_STRUCTURED_OUTPUTS_KEYS)}")
        out[k] = _bool(v) if want is bool else str(v)
    if out["backend"] not in STRUCTURED_OUTPUT_BACKENDS:
        raise argparse.ArgumentTypeError(f"backend {out['backend']!r} is not available; pagoda "
                                         f"compiles grammars with xgrammar (use auto or xgrammar)")
    return out


RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "none", "embed", "classify")
TASKS = ("auto", "generate", "embed", "embedding", "classify", "score")
# --task X -> (--runner, --convert)
_TASK_MEANING = {"auto": ("auto", "auto"), "generate": ("generate", "auto"),
                 "embed": ("pooling", "embed"), "embedding": ("pooling", "embed"),
                 "classify": ("pooling", "classify"), "score": ("pooling", "auto")}

QUANT_METHODS = ("gguf", "int8", "fp8", "int4", "awq", "gptq", "none")
KV_CACHE_DTYPES = ("auto", "int8", "int4", "fp8", "fp8_e4m3", "fp8_e5m2")
# LMDeploy's --quant-policy: 0 = as the model, 4 = 4-bit KV, 8 = 8-bit KV
_QUANT_POLICY = {"0": "auto", "4": "int4", "8": "int8"}

_DTYPE_ALIASES = {"half": "float16", "fp16": "float16", "float": "float32", "fp32": "float32",
                  "bf16": "bfloat16"}


@dataclass
class EngineArgs:
    """Every engine flag, declared once: a field here is an `LLM(...)` keyword argument, a
    `pagoda serve` flag (vLLM's name, LMDeploy's as alias) and a PAGODA_<NAME> variable."""
    model: Optional[str] = flag(None, "Model: a local HF-format directory, a .gguf file, or a Hugging "
                                "Face hub id. Default: the bundled SmolLM2-135M-Instruct.")
    tokenizer: Optional[str] = flag(None, "Tokenizer directory or hub id (default: the model's).")
    revision: Optional[str] = flag(None, "Hub revision (branch, tag or commit) of the model.")
    trust_remote_code: bool = flag(False, "Allow custom code from the hub (configs/tokenizers only; "
                                   "the model code is pagoda's own).")
    download_dir: Optional[str] = flag(None, "Where hub downloads are cached (default: HF_HOME's hub "
                                       "cache).")
    dtype: str = flag("auto", "Weight and activation dtype; auto = bfloat16 on GPU, float32 on CPU.",
                      choices=("auto", "float32", "bfloat16", "float16", "half", "float", "fp32",
                               "bf16", "fp16"))
    quantization: Optional[str] = flag(
        None, "Weight quantization. gguf (CPU): a GGUF's own 4/5/6/8-bit blocks kept packed and "
        "multiplied with directly. int8: 8-bit weights (CPU: groups of 32 with a scale and min; "
        "CUDA: weight-only per channel). int4: 4-bit weights (CPU: float weights packed as Q4_1 "
        "blocks for the gguf kernel; CUDA: groups of 128 with 16-bit activations, W4A16). fp8: "
        "float8 weights per channel with per-token activation scales (fp8 tensor cores on "
        "Ada/Hopper). awq, gptq: 4-bit checkpoints, found from their quantization_config (the flag "
        "may be left out; so may fp8 for an FP8 checkpoint). none: weights in --dtype. Default: "
        "the checkpoint's format; gguf for a quantized GGUF on the CPU; else none.",
        aliases=("-q", "quantize"), choices=QUANT_METHODS)
    max_model_len: Optional[int] = flag(None, "Longest prompt + output per request (default: the "
                                        "model's max_position_embeddings).", aliases=("session-len",))
    load_format: str = flag("auto", "auto = read the checkpoint; dummy = random weights of the "
                            "model's shape (benchmarks without downloads).", choices=("auto", "dummy"))
    skip_tokenizer_init: bool = flag(False, "No tokenizer: prompts must be token ids and outputs "
                                     "carry no text.")
    seed: int = flag(0, "Seed for requests that give none.")
    device: str = flag("auto", "auto, cpu, cuda or cuda:N (or set CUDA_VISIBLE_DEVICES).")
    threads: Optional[int] = flag(None, "CPU threads for the model (torch and pagoda's C kernels). "
                                  "Default: OMP_NUM_THREADS if set, else one per physical core this "
                                  "process may use.", aliases=("-t",))
    max_logprobs: int = flag(20, "Largest logprobs / top_logprobs a request may ask for.")
    served_model_name: Optional[list[str]] = flag(
        None, "Name(s) the API answers to (default: the model argument). The first is reported in "
        "responses.", nargs="+")
    runner: str = flag("auto", "generate: text generation; pooling: embeddings, classification and "
                       "scores (/v1/embeddings, /pooling, /classify, /score, /rerank). auto: from the "
                       "architecture (BertModel, XLMRobertaModel, ...ForSequenceClassification pool; "
                       "...ForCausalLM generates).", choices=RUNNERS)
    convert: str = flag("auto", "Run a decoder (...ForCausalLM) checkpoint as a pooling model: embed = "
                        "the last token's final hidden state, normalized (Qwen3-Embedding); classify = "
                        "a classification head on the last token (the checkpoint's `score` weights). "
                        "auto: embed under --runner pooling, none otherwise.", choices=CONVERTS)
    task: Optional[str] = flag(None, "vLLM's older spelling of --runner/--convert: generate; embed "
                               "(or embedding) = --runner pooling --convert embed; classify = --runner "
                               "pooling --convert classify; score = --runner pooling.", choices=TASKS)
    # KV cache
    block_size: int = flag(16, "Tokens per KV-cache block.", group="KV cache",
                           aliases=("cache-block-seq-len",))
    gpu_memory_utilization: float = flag(
        0.9, "Share of GPU memory pagoda may use (weights, activations and KV cache). Lower it if "
        "startup runs out of memory.", group="KV cache", aliases=("cache-max-entry-count",))
    kv_cache_memory: Optional[int] = flag(
        None, "KV cache size in bytes (e.g. 2GiB); on CPU the default is 1 GiB. Overrides "
        "--gpu-memory-utilization for the cache.", group="KV cache", type=parse_bytes)
    num_gpu_blocks_override: Optional[int] = flag(None, "Exact number of KV-cache blocks (testing).",
                                                  group="KV cache")
    swap_space: float = flag(4, "Accepted for vLLM compatibility; pagoda preempts by recompute and "
                             "does not swap to CPU memory.", group="KV cache")
    enable_prefix_caching: bool = flag(True, "Reuse KV blocks of shared prompt prefixes.",
                                       group="KV cache")
    kv_cache_dtype: str = flag(
        "auto", "How the KV cache holds keys and values. auto: in --dtype. int8 / int4: "
        "asymmetric, a scale and zero per token per KV head (int4: two values a byte); about 2x / "
        "3.5x the tokens of a 16-bit cache in the same memory. fp8 (= fp8_e4m3), fp8_e5m2: one "
        "scale per tensor (1.0). --quant-policy is LMDeploy's spelling: 0 = auto, 4 = int4, "
        "8 = int8.", group="KV cache", aliases=("quant-policy",),
        choices=KV_CACHE_DTYPES + tuple(_QUANT_POLICY))
    # Scheduler
    max_num_seqs: Optional[int] = flag(
        None, "Most requests in one batch (default 512 on a GPU with 70+ GiB, 256 on smaller GPUs, "
        "64 on CPU).", group="Scheduler", aliases=("max-batch-size",))
    max_num_batched_tokens: Optional[int] = flag(
        None, "Token budget of one step; longer prompts are prefilled in chunks (default 8192 on "
        "GPU, 2048 on CPU).", group="Scheduler", aliases=("max-prefill-token-num",))
    enforce_eager: bool = flag(False, "Disable CUDA graphs.", group="Scheduler")
    tensor_parallel_size: int = flag(1, "Devices to split the model over: one worker process per "
                                     "rank (NCCL on GPUs, gloo on the CPU).", group="Parallel",
                                     aliases=("-tp",))
    nnodes: int = flag(1, "Hosts the tensor-parallel group spans (each runs tp / nnodes ranks).",
                       group="Parallel")
    node_rank: int = flag(0, "This host's index among --nnodes (0 runs the engine core and the "
                          "API server; the others only their ranks).", group="Parallel")
    master_addr: str = flag("127.0.0.1", "Address of node 0, where the ranks meet "
                            "(torch.distributed rendezvous).", group="Parallel")
    master_port: int = flag(29500, "Port of the rendezvous on node 0 (the next two ports carry the "
                            "engine's calls to the ranks).", group="Parallel")
    data_parallel_size: int = flag(1, "Engine cores behind one API server (or one LLM), each with "
                                   "its own copy of the model and KV cache (one GPU each: rank r uses "
                                   "cuda:r); requests go to the least loaded.", group="Parallel",
                                   aliases=("-dp",))
    attention_backend: str = flag("auto", "auto (triton on CUDA, torch otherwise), torch or triton.",
                                  group="Scheduler", choices=("auto", "torch", "triton"))
    structured_outputs_config: Optional[dict] = flag(
        None, "Structured outputs (response_format, structured_outputs, guided_*): vLLM's JSON "
        'object, e.g. \'{"backend": "xgrammar", "disable_any_whitespace": true}\', or a backend '
        "name. Backends: auto = xgrammar. disable_any_whitespace: JSON without whitespace between "
        "tokens.", group="Scheduler", aliases=("guided-decoding-backend",),
        type=structured_outputs_config)
    structured_outputs_compile_timeout: float = flag(
        30.0, "Seconds a request's grammar (response_format, structured_outputs, guided_*, forced "
        "tools) may take to compile against the vocabulary; one that takes longer fails its request "
        "with a 400 naming the field, without holding up other requests. 0: no limit.",
        group="Scheduler")
    backend: Optional[str] = flag(None, "LMDeploy's engine choice, accepted for its command lines: "
                                  "pagoda has one engine, so it is logged and ignored.",
                                  group="Scheduler", choices=("turbomind", "pytorch"))
    # Multimodal (vision-language models)
    limit_mm_per_prompt: Optional[dict] = flag(
        None, "Most items of each modality one prompt may carry, as JSON: '{\"image\": 4}'. "
        "Default: no limit but the context length.", group="Multimodal", type=json_dict)
    mm_processor_kwargs: Optional[dict] = flag(
        None, "Overrides for the model's image processor, as JSON, e.g. "
        "'{\"max_pixels\": 200704}' (Qwen2-VL: fewer pixels, fewer image tokens).",
        group="Multimodal", type=json_dict)
    vision_max_batch_size: int = flag(1, "Most images the vision encoder runs in one engine step "
                                      "(LMDeploy's flag and default).", group="Multimodal")
    allowed_local_media_path: Optional[str] = flag(
        None, "Directory whose files requests may name as file:// image URLs (off by default).",
        group="Multimodal")
    allowed_media_domains: Optional[list[str]] = flag(
        None, "Only these hosts may be fetched for http(s) image URLs. Private, loopback and "
        "link-local addresses are refused unless their host is listed here.", group="Multimodal",
        nargs="+")
    media_fetch_timeout: float = flag(5.0, "Seconds an image URL may take to fetch.",
                                      group="Multimodal")
    max_image_bytes: int = flag(20 << 20, "Largest image (encoded bytes, e.g. 20MiB); larger is a "
                                "413.", group="Multimodal", type=parse_bytes)
    max_image_pixels: int = flag(7680 * 4320, "Largest image in pixels (width x height; default "
                                 "an 8K frame); larger is a 400.", group="Multimodal")
    # not a flag: transformers-style overrides used by tests/benchmarks
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)
        for name in ("limit_mm_per_prompt", "mm_processor_kwargs"):
            try:
                setattr(self, name, json_dict(getattr(self, name)))
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"--{name.replace('_', '-')}: {e}") from None
        if isinstance(self.max_image_bytes, str):
            self.max_image_bytes = parse_bytes(self.max_image_bytes)
        if isinstance(self.allowed_media_domains, str):
            self.allowed_media_domains = [self.allowed_media_domains]
        if isinstance(self.served_model_name, str):
            self.served_model_name = [self.served_model_name]
        if isinstance(self.kv_cache_memory, str):
            self.kv_cache_memory = parse_bytes(self.kv_cache_memory)
        kv = str(self.kv_cache_dtype).strip().lower()
        self.kv_cache_dtype = {"fp8": "fp8_e4m3", **_QUANT_POLICY}.get(kv, kv)
        try:
            self.structured_outputs_config = structured_outputs_config(self.structured_outputs_config)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"--structured-outputs-config: {e}") from None
        self._apply_task()
        self.validate()

    def _apply_task(self) -> None:
        """--task (vLLM's deprecated flag) sets --runner / --convert where those were left auto."""
        if self.task is None:
            return
        if self.task not in _TASK_MEANING:
            raise ValueError(f"--task: unknown task {self.task!r}; use one of {', '.join(TASKS)}")
        runner, convert = _TASK_MEANING[self.task]
        for name, value in (("runner", runner), ("convert", convert)):
            mine = getattr(self, name)
            if value != "auto" and mine not in ("auto", value):
                raise ValueError(f"--task {self.task} means --{name} {value}, but --{name} {mine} is given")
            if mine == "auto":
                setattr(self, name, value)

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
        if not self.structured_outputs_compile_timeout >= 0:
            bad("structured-outputs-compile-timeout",
                f"must be >= 0 seconds (0: no limit), got {self.structured_outputs_compile_timeout}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            bad("max-num-batched-tokens", f"must be >= 1, got {self.max_num_batched_tokens}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            bad("num-gpu-blocks-override", f"must be >= 1, got {self.num_gpu_blocks_override}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            bad("kv-cache-memory", f"must be > 0 bytes, got {self.kv_cache_memory}")
        if self.max_logprobs < 0:
            bad("max-logprobs", f"must be >= 0, got {self.max_logprobs}")
        if self.data_parallel_size < 1:
            bad("data-parallel-size", f"must be >= 1, got {self.data_parallel_size}")
        if self.tensor_parallel_size < 1:
            bad("tensor-parallel-size", f"must be >= 1, got {self.tensor_parallel_size}")
        if self.nnodes < 1 or self.tensor_parallel_size % self.nnodes:
            bad("nnodes", f"{self.nnodes} hosts cannot share {self.tensor_parallel_size} tensor-parallel "
                "ranks evenly")
        if not 0 <= self.node_rank < self.nnodes:
            bad("node-rank", f"must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        if self.data_parallel_size > 1 and self.tensor_parallel_size > 1 and self.nnodes > 1:
            bad("nnodes", "data parallelism across several hosts is not supported; run one "
                "--data-parallel-size per host")
        if self.quantization is not None and self.quantization not in QUANT_METHODS:
            bad("quantization", f"unknown method {self.quantization!r}; supported: "
                f"{', '.join(QUANT_METHODS)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            bad("kv-cache-dtype", f"unknown cache dtype {self.kv_cache_dtype!r}; use "
                f"{', '.join(KV_CACHE_DTYPES)} (or --quant-policy 0, 4 or 8)")
        if self.quantization == "gguf" and self.device.startswith("cuda"):
            bad("quantization", "gguf runs on the CPU only so far; use int8, int4 or fp8 on CUDA")
        if self.threads is not None and self.threads < 1:
            bad("threads", f"must be >= 1, got {self.threads}")
        if self.load_format not in ("auto", "dummy"):
            bad("load-format", f"unknown format {self.load_format!r}; use auto or dummy")
        if self.attention_backend not in ("auto", "torch", "triton"):
            bad("attention-backend", f"unknown backend {self.attention_backend!r}")
        if self.runner not in RUNNERS:
            bad("runner", f"unknown runner {self.runner!r}; use {', '.join(RUNNERS)}")
        if self.convert not in CONVERTS:
            bad("convert", f"unknown conversion {self.convert!r}; use {', '.join(CONVERTS)}")
        if self.runner == "generate" and self.convert in ("embed", "classify"):
            bad("convert", f"{self.convert} makes a pooling model; it needs --runner pooling (or auto)")
        if self.backend not in (None, "turbomind", "pytorch"):
            bad("backend", f"unknown backend {self.backend!r}; LMDeploy's are turbomind and pytorch")
        for modality, n in (self.limit_mm_per_prompt or {}).items():
            if modality != "image":
                bad("limit-mm-per-prompt", f"unknown modality {modality!r}; supported: image")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                bad("limit-mm-per-prompt", f"the {modality} limit must be an integer >= 0, got {n!r}")
        if self.vision_max_batch_size < 1:
            bad("vision-max-batch-size", f"must be >= 1, got {self.vision_max_batch_size}")
        if self.media_fetch_timeout <= 0:
            bad("media-fetch-timeout", f"must be > 0 seconds, got {self.media_fetch_timeout}")
        if not self.max_image_bytes or self.max_image_bytes <= 0:
            bad("max-image-bytes", f"must be > 0, got {self.max_image_bytes}")
        if self.max_image_pixels <= 0:
            bad("max-image-pixels", f"must be > 0, got {self.max_image_pixels}")
        if self.allowed_local_media_path is not None and not os.path.isdir(self.allowed_local_media_path):
            bad("allowed-local-media-path", f"{self.allowed_local_media_path!r} is not a directory")

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, groups: dict | None = None,
                     skip: tuple[str, ...] = ()) -> dict:
        return add_flags(parser, [f for f in engine_flags() if f.name not in skip], groups)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace, skip: tuple[str, ...] = ()) -> "EngineArgs":
        """skip: engine flags (dest names) the parser gave another meaning (`pagoda bench
        --backend` names the backends to compare)."""
        names = {f.name for f in dataclasses.fields(cls)} - set(skip)
        return cls(**{k: v for k, v in vars(ns).items() if k in names and k != "extra"})

    @classmethod
    def from_kwargs(cls, **kw) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(kw) - names
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
        return cls(**kw)


def _flag_type(annotation: Any) -> tuple[Optional[Callable], bool]:
    """(argparse type, is boolean) of a field's annotation: Optional[int] -> (int, False)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    base = typing.get_origin(args[0]) or args[0]
    if base is bool:
        return None, True
    if base is list:
        inner = typing.get_args(args[0])
        return (inner[0] if inner else str), False
    return (base if base in (int, float, str) else str), False


def engine_flags() -> list[Flag]:
    """The command-line view of EngineArgs' fields (in declaration order)."""
    hints = typing.get_type_hints(EngineArgs)
    out = []
    for f in dataclasses.fields(EngineArgs):
        meta = f.metadata.get("flag")
        if meta is None:
            continue
        ftype, boolean = _flag_type(hints[f.name])
        out.append(Flag(f.name.replace("_", "-"), meta["type"] or ftype, f.default, meta["help"],
                        group=meta["group"], aliases=meta["aliases"], choices=meta["choices"],
                        boolean=boolean, nargs=meta["nargs"]))
    return out


def load_config_file(path: str) -> dict:
    """A YAML (or JSON) file mapping flag names (dashes or underscores) to values."""
    import yaml
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of flag names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def data_parallel_rank_args(args: EngineArgs, rank: int) -> EngineArgs:
    """The EngineArgs of one data-parallel engine core: on CUDA, rank r runs on devices
    r * tp .. r * tp + tp - 1, and its tensor-parallel group meets on ports of its own."""
    if args.data_parallel_size == 1:
        return args
    device = args.device
    if device in ("auto", "cuda"):
        import torch
        if device == "cuda" or torch.cuda.is_available():
            device = f"cuda:{rank * args.tensor_parallel_size}"
    return dataclasses.replace(args, device=device, master_port=args.master_port + 10 * rank)


@dataclass
class ModelConfig:
    """What the engine and the API server need to know about a model, read from its config
    (no weights): limits, vocabulary, the EOS ids and whether it generates or pools."""
    model: str                        # as the user named it (or the bundled name)
    served_model_names: list[str]
    max_model_len: int
    vocab_size: int
    architecture: str
    runner: str                       # "generate" | "pooling" (embeddings, classification, scores)
    hf_config: Any = None
    generation_config: dict = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()
    # pooling models: what their head computes, "embed" (a vector) or "classify" (class logits)
    pooling_kind: str = ""
    pooling_model: Any = None         # models.registry.PoolingModel: the class and how it runs
    pooler_config: Any = None         # layers.pooler.PoolingConfig: pooling modes, normalization
    embedding_size: int = 0           # embed: the length of the vectors
    id2label: dict = field(default_factory=dict)  # classify: label names, by class index
    # embed: sizes the model was trained to be truncated to (Matryoshka); [] = any size, None = none
    matryoshka_dimensions: Optional[list[int]] = None
    uses_token_type_ids: bool = False  # BERT-style segment ids (text pairs of cross-encoders)
    is_encoder_decoder: bool = False   # Whisper: each request brings audio for its encoder
    # resolved by the engine core once it owns the device
    dtype: str = ""
    device: str = ""
    # vision-language models: the composite config (hf_config is its language model's)
    mm_hf_config: Any = None

    @property
    def is_pooling(self) -> bool:
        return self.runner == "pooling"

    @property
    def is_multimodal(self) -> bool:
        return self.mm_hf_config is not None

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def supported_tasks(self) -> tuple[str, ...]:
        """The PoolingParams tasks this model answers (score: a one-label cross-encoder; bi-encoders
        score by the cosine of two `embed` results, computed by the caller)."""
        if self.pooling_kind == "embed":
            return ("embed", "encode")
        if self.pooling_kind == "classify":
            return ("classify", "encode") + (("score",) if self.num_labels == 1 else ())
        return ()
