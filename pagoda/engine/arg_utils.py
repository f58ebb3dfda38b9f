"""vLLM's import path for the engine arguments: ``from pagoda.engine.arg_utils import
AsyncEngineArgs, EngineArgs``. The flags themselves are declared once, in `pagoda.config`."""
from __future__ import annotations

from dataclasses import dataclass

from pagoda.config import EngineArgs

__all__ = ["AsyncEngineArgs", "EngineArgs"]


@dataclass
class AsyncEngineArgs(EngineArgs):
    """EngineArgs for `AsyncLLMEngine`, plus vLLM's request-log switch of the async engine:
    with enable_log_requests each request is logged as it arrives (pagoda.async_llm_engine)."""
    enable_log_requests: bool = False
    disable_log_requests: bool = True  # vLLM's older, inverted spelling; enable_log_requests wins
