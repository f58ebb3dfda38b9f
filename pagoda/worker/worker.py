"""One worker: the device, the model on it, the memory plan and the KV cache, and the model runner
that executes the scheduler's steps. It receives plain data only (EngineArgs, SchedulerOutput),
so it can live in the engine core's process, or later in a process of its own per rank.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from pagoda.config import EngineArgs
from pagoda.distributed.parallel_state import ParallelConfig, all_reduce_min, init_tensor_parallel
from pagoda.kernels import cpu_build
from pagoda.platforms import building_for, select_platform
from pagoda.startup import StartupTimes
from pagoda.worker import kv_cache as kvc
from pagoda.worker import loader, threads
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
    def __init__(self, args: EngineArgs, parallel: Optional[ParallelConfig] = None):
        from pagoda.models.registry import resolve_model_class, resolve_pooling_class
        self.args = args
        self.parallel = parallel or ParallelConfig()
        self.startup = StartupTimes()
        self.device = pick_device(args.device)
        if self.parallel.world_size > 1 and self.device.type == "cuda":
            index = (self.device.index or 0) + self.parallel.local_rank  # after a DP rank's first GPU
            if index >= torch.cuda.device_count():
                raise ValueError(f"--tensor-parallel-size: rank {self.parallel.rank} needs GPU {index}, "
                                 f"but {torch.cuda.device_count()} are visible")
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
        init_tensor_parallel(self.parallel)
        self.dtype = pick_dtype(args.dtype, self.device)
        if self.device.type == "cpu":
            threads.set_threads(args.threads, max(1, args.tensor_parallel_size // args.nnodes))
            cpu_build.build_in_background()  # the C kernels compile while the model loads
        self.platform = select_platform(self.device.type, args.attention_backend)
        self.source, self.model_config = resolve_model_config(args)
        mc = self.model_config
        mc.dtype, mc.device = str(self.dtype).removeprefix("torch."), str(self.device)
        hf = mc.hf_config
        self.startup.mark("config")
        if mc.is_pooling:
            if self.parallel.world_size > 1:
                raise ValueError("--tensor-parallel-size: pooling models run on one device")
            pm = mc.pooling_model
            if args.quantization in ("gguf", "int8", "int4") and not pm.decoder:
                raise ValueError(f"--quantization: {args.quantization} is not supported for encoder "
                                 "(BERT, RoBERTa) models")
            model_cls = resolve_pooling_class(pm)
            kwargs = {"max_position": mc.max_model_len} if pm.decoder else {}
        else:
            if mc.is_multimodal and self.parallel.world_size > 1:
                raise ValueError("--tensor-parallel-size: vision-language models run on one device")
            model_cls = resolve_model_class(mc.mm_hf_config or hf)
            kwargs = {"max_position": mc.max_model_len}
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device), building_for(self.platform):
                model = model_cls(mc.mm_hf_config or hf, **kwargs)
        finally:
            torch.set_default_dtype(prev)
        self.quantization = q = self._pick_quantization(model)
        # a GGUF's quantized matrices go to the layers as they are (no float round trip): packed
        # blocks (gguf, int4) or Q4/Q8 blocks as int8 groups; one rank only (the others slice floats)
        on_cpu = self.device.type == "cpu"
        kept = ({} if q in ("gguf", "int4", "int8") and on_cpu
                and self.parallel.world_size == 1 else None)
        self._load_weights(model, kept, "int8" if q == "int8" else "gguf")
        if q in ("gguf", "int8") or (q == "int4" and on_cpu):
            loader.quantize_weights(model, q, kept)
        elif q != "none":  # fp8, int4 on CUDA, awq, gptq
            self._quantize_linears(model)
        del kept
        self.model = model.eval()
        self.startup.mark("weights")

        on_cuda = self.device.type == "cuda"
        default_seqs = 64
        if on_cuda:  # big cards batch more, as vLLM does on 70+ GiB (CUDA graphs stop at 512)
            mem = torch.cuda.get_device_properties(self.device).total_memory
            default_seqs = 512 if mem >= 70 * 2**30 else 256
        if getattr(model, "is_encoder_decoder", False) and not args.max_num_seqs:
            # each running request keeps its audio's cross-attention K/V (one store row per slot)
            from pagoda.worker.cross_attention import CrossAttentionStore
            row = CrossAttentionStore.bytes_per_row(model, self.dtype)
            limit = (torch.cuda.get_device_properties(self.device).total_memory // 10 if on_cuda
                     else kvc.CPU_DEFAULT_KV_BYTES)
            default_seqs = max(1, min(default_seqs, limit // row))
        self.max_num_seqs = args.max_num_seqs or default_seqs
        self.max_num_batched_tokens = args.max_num_batched_tokens or (8192 if on_cuda else 2048)
        pooler = None
        if mc.is_pooling:
            from pagoda.layers.pooler import Pooler
            pooler = Pooler(mc.pooler_config, model.classify if mc.pooling_kind == "classify" else None)
            self.embedding_size = mc.embedding_size
        self.pooler = pooler
        self.runner = ModelRunner(model, hf, self.device, self.dtype, args.block_size, self.max_num_seqs,
                                  mc.max_model_len, args.seed, pooler=pooler,
                                  kv_cache_dtype=args.kv_cache_dtype,
                                  calculate_kv_scales=args.calculate_kv_scales)
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
    def _load_weights(self, model, kept: Optional[dict] = None, form: str = "int8") -> None:
        from tqdm import tqdm
        args, src = self.args, self.source
        if args.load_format == "dummy":
            g = torch.Generator(device=self.device).manual_seed(args.seed)
            for p in model.parameters():
                p.data.normal_(0, 0.02, generator=g)
            return
        if src.gguf_file:
            total = loader.gguf_tensor_count(src)
            weights = loader.iter_gguf(src, self.model_config.hf_config, kept, form)
        else:
            total = loader.count_safetensors(src.weights_dir)
            weights = loader.iter_safetensors(src.weights_dir, lazy=self.parallel.world_size > 1)
        bar = tqdm(weights, total=total, desc="Loading weights", unit="tensor", leave=False,
                   disable=None)
        with loader.loading_threads():
            loaded = model.load_weights(bar)
        # an AWQ / GPTQ layer's packed tensors stand for its weight
        loaded = {n.replace(".qweight", ".weight") for n in loaded}
        missing = model.expected_weights() - loaded
        if missing:
            raise ValueError(f"--model: checkpoint is missing {len(missing)} weight(s), e.g. "
                             f"{sorted(missing)[:3]}")

    def _pick_quantization(self, model) -> str:
        """vLLM runs a GGUF's quantized weights as they are (--quantization gguf); so does
        pagoda on the CPU, multiplying with the file's blocks in pagoda/kernels/cpu_gguf.c
        (tests/test_fidelity.py runs the bundled GGUF this way against transformers). An AWQ /
        GPTQ / FP8 checkpoint's linear layers are told its format before they load."""
        from pagoda.layers.linear import Linear
        from pagoda.layers.quantization import checkpoint
        q = self.args.quantization
        src = self.source
        on_cpu = self.device.type == "cpu"
        if not src.gguf_file:
            q, ckpt = checkpoint.resolve(q, self.model_config.hf_config)
            if ckpt is not None:
                for m in model.modules():
                    if isinstance(m, Linear):
                        m.checkpoint_quant = ckpt
        if q == "gguf" and not on_cpu:
            raise ValueError(f"--quantization: gguf runs on the CPU only so far; use int8, int4 or "
                             f"fp8 on {self.device.type}")
        if q == "gguf" and not src.gguf_file:
            raise ValueError("--quantization: gguf needs a .gguf model; for this checkpoint use int4 "
                             "or int8")
        if q in checkpoint.CHECKPOINT_METHODS + ("fp8",) or (q == "int4" and not on_cpu):
            if self.parallel.world_size > 1:
                raise ValueError(f"--quantization: {q} runs on one device; use --tensor-parallel-size 1")
            if self.model_config.is_pooling and not self.model_config.pooling_model.decoder:
                raise ValueError(f"--quantization: {q} is not supported for encoder (BERT, RoBERTa) models")
        if q is None:
            q = "none"
            if src.gguf_file and on_cpu and self.args.load_format != "dummy":
                types = loader.gguf_quant_types(src)
                if types:
                    q = "gguf"
                    logger.info("GGUF weights are %s: running them packed on the CPU "
                                "(--quantization none for %s)", ",".join(sorted(types)), self.dtype)
        if q in ("gguf", "int4") and self.parallel.world_size > 1:
            logger.info("--quantization %s: each tensor-parallel rank packs its slice of the float "
                        "weights (%s)", q, "int8 groups" if q == "gguf" else "Q4_1 blocks")
        return q

    def _quantize_linears(self, model) -> None:
        """fp8 / int4 / AWQ / GPTQ: every linear layer in that format (the LM head stays in
        --dtype, as vLLM keeps it)."""
        from pagoda.layers.linear import Linear
        for m in model.modules():
            if isinstance(m, Linear):
                m.quantize(self.quantization)
        logger.info("weights: %s (%d linear layers)", self.quantization,
                    sum(isinstance(m, Linear) and m.quant is not None for m in model.modules()))

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
        n = all_reduce_min(n)  # every rank must hold the same blocks
        fmt = runner.kv_format
        if fmt.kind is not None:
            logger.info("KV cache %s: %d blocks (%d tokens), %d bytes a block; %.2fx the tokens of a "
                        "16-bit cache in the same memory", fmt.kind, n, n * args.block_size,
                        block_bytes, fmt.capacity_vs(torch.bfloat16))
        kvc.check_fits(n, args.block_size, max_model_len, on_cuda)
        return n

    def initialize_cache(self, num_blocks: int) -> None:
        if self.runner.has_kv_cache:
            self.runner.allocate_kv_cache(num_blocks)
        self.num_blocks = num_blocks
        on_cuda = self.device.type == "cuda"
        if (on_cuda and not self.args.enforce_eager and self.platform.ops.triton and self.runner.has_kv_cache
                and self.runner.cross is None):  # cross-attention runs eagerly
            self.runner.capture_cuda_graphs(self.max_num_seqs, self.model_config.max_model_len)
        self.startup.mark("kv cache")

    def warm_up(self) -> None:
        """Run each kind of step once before serving, so that every kernel variant they use (on
        CUDA: Triton compiles one per specialization) is built now, not inside the first
        requests: short and long prefills, a second chunk over cached tokens, a mixed
        prefill + decode step, greedy and sampled rows (top-p, top-k with penalties, min-p with
        logprobs). It runs on the KV cache's last blocks (free at start) with requests the
        engine never sees."""
        from pagoda.sampling_params import SamplingParams
        runner, bs = self.runner, self.args.block_size
        if not runner.has_kv_cache:
            return
        budget = min(self.max_num_batched_tokens, self.model_config.max_model_len - 2, 512)
        lengths = sorted({n for n in (3, 16, 17, budget // 2, budget) if n >= 1})
        if runner.kv_scales_pending():  # --calculate-kv-scales measures on the longest prompt
            lengths.reverse()
        if self.num_blocks < sum(-(-(n + 2) // bs) for n in lengths) + 2:
            return
        vocab = self.model_config.vocab_size
        # the sampler's kernel variants: plain greedy, top-p, top-k with penalties, min-p with logprobs,
        # top-p with min-p
        params = [SamplingParams(temperature=0, max_tokens=2),
                  SamplingParams(temperature=1.0, top_p=0.9, max_tokens=2),
                  SamplingParams(temperature=0.8, top_k=50, repetition_penalty=1.1, max_tokens=2),
                  SamplingParams(temperature=1.0, min_p=0.05, logprobs=5, max_tokens=2),
                  SamplingParams(temperature=0.7, top_p=0.95, min_p=0.05, max_tokens=2)]
        last = self.num_blocks - 1
        made: list[tuple[str, int]] = []
        for i, n in enumerate(lengths):
            k = -(-(n + 2) // bs)
            blocks, last = list(range(last - k + 1, last + 1)), last - k
            rid = f"__warmup{i}"
            ids = [(7 * j + i) % vocab for j in range(n)]
            first = n // 2 if n > 16 and i % 2 else n  # odd lengths: a second chunk over cached tokens
            runner.execute(_step(new=[(rid, ids, blocks, first, params[i % len(params)])]))
            if first < n:
                runner.execute(_step(cached=[(rid, first, n - first)]))
            made.append((rid, n))
        # a mixed step: every warm-up request decodes one token while a short prompt prefills,
        # the first under a structured-outputs bitmask (its kernel, in the logits' dtype)
        mixed = _step(new=[("__warmup_mixed", [5, 6, 7], [last], 3, params[0])],
                      cached=[(rid, n, 1) for rid, n in made])
        mixed.grammar = _warmup_bitmask(made[0][0], vocab)
        runner.execute(mixed)
        runner.forget([rid for rid, _ in made] + ["__warmup_mixed"])
        self.startup.mark("warm-up")

    # -- steps ----------------------------------------------------------------------------------
    def execute_model(self, scheduler_output) -> PendingStep:
        return self.runner.launch(scheduler_output)

    def describe(self) -> str:
        return (f"{self.model_config.model} on {self.device} ({self.model_config.dtype}), "
                f"{self.num_blocks} KV blocks x {self.args.block_size} tokens")


def _warmup_bitmask(req_id: str, vocab: int):
    """A SchedulerOutput.grammar for one row (the warm-up's): every token but the last allowed,
    so the mask kernel runs and has a token to mask (plain data: the worker imports nothing from
    the engine)."""
    from types import SimpleNamespace as NS
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    return NS(req_ids=[req_id], vocab_size=vocab - 1, get=lambda: bitmask)


def _step(new=(), cached=()):
    """A scheduler step as plain data (the fields the model runner reads), for the warm-up:
    new = (req id, prompt ids, blocks, tokens now, params); cached = (req id, computed, tokens)."""
    from types import SimpleNamespace as NS
    step = NS(scheduled_new_reqs=[], num_scheduled_tokens={}, finished_req_ids=set(), grammar=None,
              scheduled_cached_reqs=NS(req_ids=[], resumed_from_preemption=[], new_block_ids=[],
                                       num_computed_tokens=[]))
    for rid, ids, blocks, n, params in new:
        step.scheduled_new_reqs.append(NS(req_id=rid, prompt_token_ids=ids, sampling_params=params,
                                          pooling_params=None, block_ids=blocks, num_computed_tokens=0,
                                          token_type_ids=None))
        step.num_scheduled_tokens[rid] = n
    c = step.scheduled_cached_reqs
    for rid, computed, n in cached:
        c.req_ids.append(rid)
        c.resumed_from_preemption.append(False)
        c.new_block_ids.append([])
        c.num_computed_tokens.append(computed)
        step.num_scheduled_tokens[rid] = n
    step.total_num_scheduled_tokens = sum(step.num_scheduled_tokens.values())
    return step
