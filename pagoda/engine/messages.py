"""What crosses between the API server and the engine core: plain structs, msgpack-encoded.

Requests go in (add / abort / utility calls); one `EngineCoreOutputs` comes out per engine step
with every request's new tokens, finish reason and logprob rows. msgspec structs with
`array_like` encode as msgpack arrays (no field names on the wire); tensors travel as raw bytes.
"""
from __future__ import annotations

import enum
from typing import Any, Optional, Union

import msgspec
import numpy as np

from pagoda.pooling_params import PoolingParams
from pagoda.sampling_params import SamplingParams
from pagoda.sample.logprobs import LogprobsLists


class RequestType(enum.IntEnum):
    ADD = 0
    ABORT = 1
    UTILITY = 2
    SHUTDOWN = 3


class Tensor(msgspec.Struct, array_like=True):
    """A numpy array as bytes (pooled embeddings, scores, image processor outputs). dtype
    "bfloat16" (which numpy lacks) holds torch's bfloat16 bytes: read it with torch."""
    dtype: str
    shape: list[int]
    data: bytes

    @classmethod
    def of(cls, a: np.ndarray) -> "Tensor":
        a = np.ascontiguousarray(a)
        return cls(str(a.dtype), list(a.shape), a.tobytes())

    def numpy(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape)


class MultiModalFeature(msgspec.Struct, array_like=True, omit_defaults=True):
    """One image of a prompt as the front end prepared it: its placeholder range in the prompt
    (offset, length: the range may hold text tokens too, e.g. Idefics3's row/column tokens;
    num_embeds of its positions are the image token and take the encoder's rows, in order),
    the image processor's outputs for it, and a hash of those outputs that keys the encoder
    cache and the prefix cache."""
    identifier: str
    offset: int
    length: int
    num_embeds: int
    data: dict[str, Tensor] = {}
    modality: str = "image"


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Optional[SamplingParams] = None
    pooling_params: Optional[PoolingParams] = None
    arrival_time: float = 0.0
    client_index: int = 0          # which API server process gets this request's outputs
    token_type_ids: Optional[list[int]] = None
    mm_features: Optional[list[MultiModalFeature]] = None   # images, by offset
    encoder_features: Optional[Tensor] = None  # Whisper: log-mel features of one 30 s window


class FinishReason(enum.IntEnum):
    STOP = 0
    LENGTH = 1
    ABORT = 2
    ERROR = 3

    def __str__(self) -> str:
        return self.name.lower()


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    new_token_ids: list[int] = []
    new_logprobs: Optional[LogprobsLists] = None
    new_prompt_logprobs: Optional[LogprobsLists] = None
    pooling_output: Optional[Tensor] = None
    finish_reason: Optional[FinishReason] = None
    stop_reason: Union[int, str, None] = None
    num_cached_tokens: int = 0
    first_scheduled_time: Optional[float] = None   # set in the first output after scheduling
    num_preemptions: int = 0
    error: Optional[str] = None                    # with FinishReason.ERROR: why it failed
    invalid_request: bool = False                  # ... and it is the request's fault (a 400)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, array_like=True, omit_defaults=True):
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_gpu_blocks: int = 0
    prefix_cache_queries: int = 0   # cumulative, tokens
    prefix_cache_hits: int = 0
    num_preemptions: int = 0        # cumulative
    prompt_tokens_total: int = 0    # cumulative
    generation_tokens_total: int = 0
    # this step
    step_prompt_tokens: int = 0
    step_generation_tokens: int = 0
    step_time_s: float = 0.0
    step_kind: str = ""             # "decode-graph" | "eager" | "" (no model step)
    # images (cumulative): placeholders received, encoder-cache lookups / hits, images encoded
    mm_images_total: int = 0
    encoder_cache_queries: int = 0
    encoder_cache_hits: int = 0
    images_encoded_total: int = 0
    step_encoder_seconds: list[float] = []   # this step: one entry per vision-encoder run


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    outputs: list[EngineCoreOutput] = []
    timestamp: float = 0.0
    scheduler_stats: Optional[SchedulerStats] = None
    utility_output: Optional["UtilityOutput"] = None
    engine_dead: Optional[str] = None


class UtilityCall(msgspec.Struct, array_like=True):
    call_id: int
    method: str
    args: list[Any] = []


class UtilityOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    call_id: int
    result: Any = None
    failure: Optional[str] = None


class EngineReady(msgspec.Struct, array_like=True):
    """The engine core's handshake: what it resolved while starting (for logs, metrics, limits)."""
    num_gpu_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    device: str
    dtype: str
    quantization: str
    startup_s: float
    embedding_size: int = 0        # pooling models: the size of their vectors


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return Tensor.of(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


class Encoder:
    def __init__(self):
        self._enc = msgspec.msgpack.Encoder(enc_hook=_enc_hook)

    def __call__(self, obj: Any) -> bytes:
        return self._enc.encode(obj)


def decoder(kind: type) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(kind)
