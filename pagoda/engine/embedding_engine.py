"""EmbeddingEngine: token ids in, one pooled vector per input out (encoder models like BERT).

An encoder reads each input once, whole, and keeps nothing afterwards, so none of the generation
machinery applies: no KV cache, no scheduler, no sampler. Inputs are sorted by length and cut
into right-padded batches under the same limits as generation (--max-num-seqs inputs and
--max-num-batched-tokens padded tokens per forward); sorting keeps the padding small.

The model is found and read by the same loader as LLMEngine's; ``--max-model-len`` defaults to
the model's max_position_embeddings and longer inputs are refused, never truncated silently.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Sequence, Union

import torch

from pagoda.config import EngineArgs
from pagoda.engine.engine import EngineStats, ModelConfig, StepStats, _pick_device, _pick_dtype
from pagoda.layers.pooler import PoolingConfig, pool

logger = logging.getLogger("pagoda.engine")

EmbedPrompt = Union[str, list[int], dict]


def is_embedding_model(args: EngineArgs) -> bool:
    """Whether ``args.model`` is an encoder to serve embeddings with (reads its config only)."""
    from pagoda.models.registry import is_embedding_model as arch_is_embedding
    from pagoda.worker import loader
    src = loader.resolve_model(args.model, args.tokenizer, args.revision, args.download_dir)
    if src.gguf_file:
        return False
    return arch_is_embedding(loader.load_config(src, args.trust_remote_code))


class EmbeddingEngine:
    def __init__(self, args: EngineArgs):
        from pagoda.models.registry import resolve_embedding_class
        from pagoda.worker import loader

        t0 = time.time()
        self.args = args
        if args.quantization in ("int8", "int4"):
            raise ValueError(f"--quantization: {args.quantization} is not supported for embedding models")
        self.device = _pick_device(args.device)
        self.dtype = _pick_dtype(args.dtype, self.device)
        if self.device.type == "cpu":
            from pagoda.worker.cpu_threads import set_threads
            set_threads(args.threads)
        src = loader.resolve_model(args.model, args.tokenizer, args.revision, args.download_dir)
        if src.gguf_file:
            raise ValueError("--model: GGUF embedding models are not supported; pass an HF directory")
        hf_config = loader.load_config(src, args.trust_remote_code)
        model_cls = resolve_embedding_class(hf_config)
        self.tokenizer = None if args.skip_tokenizer_init else loader.load_tokenizer(src, args.trust_remote_code)

        max_pos = int(hf_config.max_position_embeddings)
        if args.max_model_len and args.max_model_len > max_pos:
            raise ValueError(f"--max-model-len: {args.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({max_pos})")
        max_model_len = args.max_model_len or max_pos
        self.pooling = PoolingConfig.from_model_dir(src.config_dir)
        self.pad_token_id = int(getattr(hf_config, "pad_token_id", None) or 0)

        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = model_cls(hf_config)
        finally:
            torch.set_default_dtype(prev)
        self._load_weights(model, src)
        self.model = model.eval()
        self.embedding_size = model.hidden_size * len(self.pooling.modes)

        self.model_config = ModelConfig(src.name, args.served_model_name or [src.name], max_model_len,
                                        hf_config.vocab_size, (), str(self.dtype).removeprefix("torch."),
                                        str(self.device), hf_config, {})
        on_cuda = self.device.type == "cuda"
        self.max_num_seqs = args.max_num_seqs or (256 if on_cuda else 64)
        # an input longer than the budget still runs, alone
        self.max_num_batched_tokens = args.max_num_batched_tokens or (8192 if on_cuda else 2048)
        self.prompt_tokens_total = 0
        self.step_listeners: list[Callable[[StepStats], None]] = []
        logger.info("embedding engine ready in %.1fs: %s on %s (%s), %d-dim %s%s embeddings, "
                    "max_model_len %d", time.time() - t0, src.name, self.device,
                    self.model_config.dtype, self.embedding_size, "+".join(self.pooling.modes),
                    " normalized" if self.pooling.normalize else "", max_model_len)

    def _load_weights(self, model, src) -> None:
        from pagoda.worker import loader
        if self.args.load_format == "dummy":
            g = torch.Generator(device=self.device).manual_seed(self.args.seed)
            for p in model.parameters():
                p.data.normal_(0, 0.02, generator=g)
            return
        missing = model.expected_weights() - model.load_weights(loader.iter_safetensors(src.weights_dir))
        if missing:
            raise ValueError(f"--model: checkpoint is missing {len(missing)} weight(s), e.g. "
                             f"{sorted(missing)[:3]}")

    # -- inputs ----------------------------------------------------------------------------------
    def tokenize(self, prompt: EmbedPrompt) -> list[int]:
        if isinstance(prompt, dict):
            prompt = prompt["prompt_token_ids"] if "prompt_token_ids" in prompt else prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("input: text needs a tokenizer (started with --skip-tokenizer-init); "
                                 "send token ids")
            return list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise ValueError("input: must be a string or a list of token ids")

    def check(self, inputs: Sequence[list[int]]) -> None:
        """ValueError naming the input and the limit; called before anything runs."""
        mc = self.model_config
        if not inputs:
            raise ValueError("input: must not be empty")
        for i, ids in enumerate(inputs):
            which = f"item {i} has " if len(inputs) > 1 else ""
            if not ids:
                raise ValueError(f"input: {which or 'it has '}no tokens")
            if len(ids) > mc.max_model_len:
                raise ValueError(f"input: {which}{len(ids)} tokens, but this model's maximum context "
                                 f"length (max_model_len) is {mc.max_model_len}; shorten it")
            bad = next((t for t in ids if not 0 <= t < mc.vocab_size), None)
            if bad is not None:
                raise ValueError(f"input: {which}token id {bad}, outside the vocabulary "
                                 f"(0..{mc.vocab_size - 1})")

    def batches(self, inputs: Sequence[list[int]]) -> list[list[int]]:
        """Input indices grouped into forwards: shortest first, each group under the limits."""
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        groups: list[list[int]] = []
        for i in order:  # ascending lengths: the newest input is the longest of its group
            g = groups[-1] if groups else None
            if (g is None or len(g) >= self.max_num_seqs
                    or (len(g) + 1) * len(inputs[i]) > self.max_num_batched_tokens):
                groups.append([i])
            else:
                g.append(i)
        return groups

    # -- running ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, inputs: Sequence[list[int]]) -> torch.Tensor:
        """One right-padded batch -> [B, embedding_size] float32 on the CPU."""
        t0 = time.time()
        width = max(len(ids) for ids in inputs)
        ids = torch.full((len(inputs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.bool)
        for r, row in enumerate(inputs):
            ids[r, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[r, :len(row)] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = pool(self.model(ids, mask), mask, self.pooling).cpu()
        n = sum(len(row) for row in inputs)
        self.prompt_tokens_total += n
        stats = StepStats(n, 0, len(inputs), 0, 0.0, time.time() - t0)
        for fn in self.step_listeners:
            try:
                fn(stats)
            except Exception:  # a broken listener must not fail the batch
                logger.exception("step listener failed")
        return out

    def embed_ids(self, inputs: Sequence[list[int]]) -> list[torch.Tensor]:
        """Embeddings of already-checked token-id lists, in input order."""
        result: list[Optional[torch.Tensor]] = [None] * len(inputs)
        for group in self.batches(inputs):
            for i, vec in zip(group, self.forward([inputs[i] for i in group])):
                result[i] = vec
        return result  # type: ignore[return-value]

    def embed(self, prompts: Sequence[EmbedPrompt]) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Tokenize, check and embed; returns (token ids, embeddings), both in prompt order."""
        inputs = [self.tokenize(p) for p in prompts]
        self.check(inputs)
        return inputs, self.embed_ids(inputs)

    def get_stats(self) -> EngineStats:
        return EngineStats(0, 0, 0.0, 0, 0, 0, 0, self.prompt_tokens_total, 0)
