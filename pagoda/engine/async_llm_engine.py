"""vLLM's `AsyncLLMEngine` (``from pagoda.engine.async_llm_engine import AsyncLLMEngine``): the
async engine the API server runs (`pagoda.engine.async_llm.AsyncLLM`) under vLLM's name and
signatures, so scripts written for vLLM's Python API run with `vllm` replaced by `pagoda`:

    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=..., enable_prefix_caching=True))
    async for output in engine.generate("Hello", SamplingParams(max_tokens=32), request_id="0"):
        print(output.outputs[0].text)     # the text so far

The engine core runs in a thread on the CPU and in its own process on a GPU (as `pagoda serve`).
"""
from __future__ import annotations

import logging
from typing import AsyncIterator

from pagoda.engine.arg_utils import AsyncEngineArgs, EngineArgs
from pagoda.engine.async_llm import AsyncLLM, EngineDeadError
from pagoda.engine.core_client import engine_core_mode
from pagoda.inputs.preprocess import PromptType
from pagoda.outputs import PoolingRequestOutput, RequestOutput
from pagoda.pooling_params import PoolingParams
from pagoda.sampling_params import SamplingParams

logger = logging.getLogger("pagoda.async_llm_engine")

__all__ = ["AsyncLLMEngine", "AsyncEngineArgs", "EngineDeadError"]


class AsyncLLMEngine(AsyncLLM):
    def __init__(self, args: EngineArgs, log_requests: bool = False, **kw):
        kw.setdefault("engine_core", engine_core_mode("auto", args.device))
        super().__init__(args, **kw)
        self.log_requests = log_requests

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, start_engine_loop: bool = True,
                         usage_context=None, **kw) -> "AsyncLLMEngine":
        """Start the engine (the model loads here); `start_engine_loop` and `usage_context` are
        vLLM's and change nothing: outputs are read from the first request on."""
        log = bool(getattr(engine_args, "enable_log_requests", False)
                   or not getattr(engine_args, "disable_log_requests", True))
        return cls(engine_args, log_requests=log, **kw)

    def _log(self, request_id: str, prompt: PromptType, params) -> None:
        if self.log_requests:
            logger.info("request %s: %s, %s", request_id,
                        f"{len(prompt)} chars" if isinstance(prompt, str) else type(prompt).__name__, params)

    def generate(self, prompt: PromptType, sampling_params: SamplingParams, request_id: str,
                 lora_request=None, trace_headers=None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (each with the text so far); the last has finished=True.
        `prompt`: a string, {"prompt": str}, {"prompt_token_ids": [...]} or a token-id list."""
        if lora_request is not None:
            raise ValueError("lora_request: LoRA adapters are not supported by pagoda")
        self._log(request_id, prompt, sampling_params)
        return super().generate(prompt, sampling_params, request_id)

    def encode(self, prompt: PromptType, pooling_params: PoolingParams, request_id: str,
               lora_request=None, trace_headers=None, priority: int = 0
               ) -> AsyncIterator[PoolingRequestOutput]:
        if lora_request is not None:
            raise ValueError("lora_request: LoRA adapters are not supported by pagoda")
        self._log(request_id, prompt, pooling_params)
        return super().encode(prompt, pooling_params, request_id)

    async def get_tokenizer(self, lora_request=None):
        return self.tokenizer

    async def get_model_config(self):
        return self.model_config

    @property
    def is_running(self) -> bool:
        return self.is_healthy()

    @property
    def errored(self) -> bool:
        return not self.is_healthy()

    async def check_health(self) -> None:
        if not self.is_healthy():
            raise EngineDeadError(self._dead or "the engine core is not running")
