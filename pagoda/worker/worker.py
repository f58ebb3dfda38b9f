"""One worker: the device, the model on it, the memory plan and the KV cache, and the model runner
that executes the scheduler's steps. It receives plain data only (EngineArgs, SchedulerOutput),
so it can live in the engine core's process, or later in a process of its own per rank.
"""
from __future__ import annotations

import logging
import time
import torch

from pagoda.config import EngineArgs
from pagoda.platforms import building_for, select_platform
from pagoda.worker import kv_cache as kvc
from pagoda.worker import loader
from pagoda.worker.model_config import resolve_model_config
from pagoda.worker.model_runner import ModelRunner, PendingStep

logger = logging.getLogger("pagoda.worker")


def pick_device(arg: str) -> torch.device:
    if arg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device: {arg!r} asked for, but no CUDA device is visible")
    return torch.device(arg)


def pick_dtype(arg: str, device: torch.device) -> torch.dtype:
    if arg == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[arg]


class Worker:
    def __init__(self, args: EngineArgs):
        from pagoda.models.registry import resolve_embedding_class, resolve_model_class
        self.args = args
        self.timings: dict[str, float] = {}
        t = time.time()
        self.device = pick_device(args.device)
        self.dtype = pick_dtype(args.dtype, self.device)
        self.platform = select_platform(self.device.type, args.attention_backend)
        self.source, self.model_config = resolve_model_config(args)
        mc = self.model_config
        mc.dtype, mc.device = str(self.dtype).removeprefix("torch."), str(self.device)
        hf = mc.hf_config
        self.timings["config"] = time.time() - t
        t = time.time()
        if mc.is_pooling:
            if args.quantization == "int8":
                raise ValueError("--quantization: int8 is not supported for embedding models")
            model_cls = resolve_embedding_class(hf)
            kwargs = {}
        else:
            model_cls = resolve_model_class(mc.mm_hf_config or hf)
            kwargs = {"max_position": mc.max_model_len}
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device), building_for(self.platform):
                model = model_cls(mc.mm_hf_config or hf, **kwargs)
        finally:
            torch.set_default_dtype(prev)
        self._load_weights(model)
        self.quantization = self._pick_quantization()
        if self.quantization == "int8":
            from pagoda.layers.embedding import LMHead
            from pagoda.layers.linear import Linear
            for m in model.modules():
                if isinstance(m, (Linear, LMHead)):
                    m.quantize_int8()
        self.model = model.eval()
        self.timings["weights"] = time.time() - t

        on_cuda = self.device.type == "cuda"
        default_seqs = 64
        if on_cuda:  # big cards batch more, as vLLM does on 70+ GiB (CUDA graphs stop at 512)
            mem = torch.cuda.get_device_properties(self.device).total_memory
            default_seqs = 512 if mem >= 70 * 2**30 else 256
        self.max_num_seqs = args.max_num_seqs or default_seqs
        self.max_num_batched_tokens = args.max_num_batched_tokens or (8192 if on_cuda else 2048)
        pooling = None
        if mc.is_pooling:
            from pagoda.layers.pooler import PoolingConfig
            pooling = PoolingConfig.from_model_dir(self.source.config_dir)
            self.embedding_size = model.hidden_size * len(pooling.modes)
        self.pooling = pooling
        self.runner = ModelRunner(model, hf, self.device, self.dtype, args.block_size, self.max_num_seqs,
                                  mc.max_model_len, args.seed, pooling=pooling)
        self.num_blocks = 0
        self.encoder_cache_size = 0  # embedding rows the encoder cache holds (multimodal models)
        if mc.is_multimodal:
            self._plan_encoder_cache(model)

    def _plan_encoder_cache(self, model) -> None:
        """Room for a step's images at their largest (the image processor's limits, after
        --mm-processor-kwargs), and never less than a step's tokens."""
        ip = loader.load_image_processor(self.source, self.args.trust_remote_code,
                                         self.args.mm_processor_kwargs)
        self.processor_config = ip.to_dict()
        largest = model.profile_image_items(1, self.processor_config, torch.device("cpu"))[0]
        self.max_image_embeds = model.num_image_embeds(largest)
        self.encoder_cache_size = max(self.max_num_batched_tokens,
                                      self.args.vision_max_batch_size * self.max_image_embeds)

    # -- loading --------------------------------------------------------------------------------
    def _load_weights(self, model) -> None:
        from tqdm import tqdm
        args, src = self.args, self.source
        if args.load_format == "dummy":
            g = torch.Generator(device=self.device).manual_seed(args.seed)
            for p in model.parameters():
                p.data.normal_(0, 0.02, generator=g)
            return
        if src.gguf_file:
            if self.model_config.is_pooling:
                raise ValueError("--model: GGUF embedding models are not supported; pass an HF directory")
            total = loader.gguf_tensor_count(src.gguf_file)
            weights = loader.iter_gguf(src.gguf_file, self.model_config.hf_config)
        else:
            total = loader.count_safetensors(src.weights_dir)
            weights = loader.iter_safetensors(src.weights_dir)
        bar = tqdm(weights, total=total, desc="Loading weights", unit="tensor", leave=False,
                   disable=None)
        loaded = model.load_weights(bar)
        missing = model.expected_weights() - loaded
        if missing:
            raise ValueError(f"--model: checkpoint is missing {len(missing)} weight(s), e.g. "
                             f"{sorted(missing)[:3]}")

    def _pick_quantization(self) -> str:
        """vLLM runs a GGUF's quantized weights as they are; on the CPU our nearest fast path is
        int8 groups of 32, which hold Q4_0/Q4_1/Q8_0 blocks exactly (tests/test_cpu_kernels.py;
        tests/test_fidelity.py runs the bundled GGUF this way against transformers)."""
        q = self.args.quantization
        src = self.source
        if q is None:
            q = "none"
            if src.gguf_file and self.device.type == "cpu" and self.args.load_format != "dummy":
                types = loader.gguf_quant_types(src.gguf_file)
                if types:
                    q = "int8"
                    logger.info("GGUF weights are %s: running int8 on the CPU "
                                "(--quantization none for %s)", ",".join(sorted(types)), self.dtype)
        return q

    # -- memory ---------------------------------------------------------------------------------
    def determine_num_blocks(self) -> int:
        """KV blocks that fit: --num-gpu-blocks-override, --kv-cache-memory, or on CUDA what is
        left of --gpu-memory-utilization after weights and a profiled max-size step."""
        runner, args = self.runner, self.args
        if not runner.has_kv_cache:
            return 0
        block_bytes = runner.block_bytes()
        on_cuda = self.device.type == "cuda"
        max_model_len = self.model_config.max_model_len
        if args.num_gpu_blocks_override:
            n = args.num_gpu_blocks_override
        elif args.kv_cache_memory:
            n = args.kv_cache_memory // block_bytes
        elif on_cuda:
            peak = runner.profile_peak_memory(self.max_num_batched_tokens, max_model_len, self.max_num_seqs)
            if runner.encoders is not None:  # the vision tower at its largest batch, and its cache
                items = self.model.profile_image_items(self.args.vision_max_batch_size,
                                                       self.processor_config, self.device)
                hidden = self.model_config.hf_config.hidden_size
                peak = max(peak, runner.encoders.profile_peak(items)) + \
                    self.encoder_cache_size * hidden * self.dtype.itemsize
            free, total = torch.cuda.mem_get_info(self.device)
            non_torch = total - free - torch.cuda.memory_reserved(self.device)
            budget = int(total * args.gpu_memory_utilization) - peak - max(non_torch, 0)
            n = max(budget // block_bytes, 0)
            weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
            logger.info("memory plan: total %.1f GiB x %.2f; weights %.2f GiB; peak activations "
                        "%.2f GiB; non-torch %.2f GiB; KV cache %.2f GiB = %d blocks (%d tokens)",
                        total / 2**30, args.gpu_memory_utilization, weights / 2**30,
                        (peak - weights) / 2**30, non_torch / 2**30, n * block_bytes / 2**30, n,
                        n * args.block_size)
        else:
            n = kvc.CPU_DEFAULT_KV_BYTES // block_bytes
        kvc.check_fits(n, args.block_size, max_model_len, on_cuda)
        return n

    def initialize_cache(self, num_blocks: int) -> None:
        t = time.time()
        if self.runner.has_kv_cache:
            self.runner.allocate_kv_cache(num_blocks)
        self.num_blocks = num_blocks
        on_cuda = self.device.type == "cuda"
        if on_cuda and not self.args.enforce_eager and self.platform.ops.triton and self.runner.has_kv_cache:
            self.runner.capture_cuda_graphs(self.max_num_seqs, self.model_config.max_model_len)
        self.timings["kv cache"] = time.time() - t

    # -- steps ----------------------------------------------------------------------------------
    def execute_model(self, scheduler_output) -> PendingStep:
        return self.runner.launch(scheduler_output)

    def describe(self) -> str:
        return (f"{self.model_config.model} on {self.device} ({self.model_config.dtype}), "
                f"{self.num_blocks} KV blocks x {self.args.block_size} tokens")
