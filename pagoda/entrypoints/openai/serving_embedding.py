"""POST /v1/embeddings: one vector per input (string, strings, token ids, token-id lists).

Text is tokenized on the server's tokenizer thread (so ``usage`` is the tokenizer's exact count);
each input is one pooling request on the engine core, batched with everyone else's requests
like generation is, and aborted if the client goes away.
``encoding_format: "base64"`` packs each vector as little-endian float32, as OpenAI does.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import time

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from pagoda.engine.async_llm import EngineDeadError, RequestFailedError
from pagoda.pooling_params import PoolingParams

from .errors import OpenAIError
from .protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from .serving_base import OpenAIServing, bad_request, engine_error, random_id
from .streams import json_response, unless_disconnected

logger = logging.getLogger("pagoda.server")

GENERATION_ONLY = ("The model `{name}` is a generative model: it does not serve /v1/embeddings. "
                   "Start `pagoda serve` with an embedding model (e.g. a BertModel checkpoint).")


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


class ServingEmbedding:
    def __init__(self, serving: OpenAIServing):
        self.s = serving
        self.engine = serving.engine if serving.engine.model_config.is_pooling else None

    async def _inputs(self, req: EmbeddingRequest) -> list[list[int]]:
        items = req.input
        if isinstance(items, str) or (items and isinstance(items[0], int)):
            items = [items]
        if not items:
            raise OpenAIError("input must not be empty.", param="input")
        inputs = []
        for i, item in enumerate(items):
            if not item:
                raise OpenAIError(f"input: item {i} is empty; every input needs at least one "
                                  "character or token.", param="input")
            if isinstance(item, str):
                inputs.append(await self.s.encode(item, add_special_tokens=req.add_special_tokens))
            else:
                self.s.check_token_ids(item, "input")
                inputs.append(list(item))
        return inputs

    async def _embed(self, request_id: str, ids: list[int]) -> np.ndarray:
        """One input as one engine request, with its metrics and request log like generation's."""
        tracker = self.s.metrics.track()
        t0 = time.monotonic()
        out = None
        try:
            async for out in self.engine.encode({"prompt_token_ids": ids}, PoolingParams(task="embed"),
                                                request_id):
                pass
        except BaseException:
            tracker.finish(out, reason="abort")
            if self.s.log_requests:
                logger.info("request %s aborted: %d prompt tokens, %.2fs", request_id, len(ids),
                            time.monotonic() - t0)
            raise
        tracker.finish(out)
        if self.s.log_requests:
            logger.info("request %s finished (embedding): %d prompt tokens, %.2fs", request_id,
                        len(ids), time.monotonic() - t0)
        return out.outputs.data

    async def create(self, req: EmbeddingRequest, raw: Request) -> Response:
        s = self.s
        s.check_model(req.model)
        if self.engine is None:
            raise OpenAIError(GENERATION_ONLY.format(name=s.model_name), param="model",
                              code="unsupported")
        size = self.engine.ready.embedding_size
        if req.dimensions is not None and req.dimensions != size:
            raise OpenAIError(f"dimensions: {req.dimensions} requested, but this model only returns "
                              f"{size}-dimensional embeddings (omit dimensions or pass {size}).",
                              param="dimensions")
        inputs = await self._inputs(req)
        for ids in inputs:  # every input is checked before any runs
            try:
                self.engine.processor.check_prompt(ids, pooling=True, field="input")
            except ValueError as e:
                raise bad_request(e) from e
        s.check_engine()
        request_id = random_id("embd")
        ids = [request_id] if len(inputs) == 1 else [f"{request_id}-{i}" for i in range(len(inputs))]

        async def all_of() -> list[np.ndarray]:
            try:  # a TaskGroup cancels (aborts) the other inputs when one fails
                async with asyncio.TaskGroup() as tg:
                    tasks = [tg.create_task(self._embed(rid, x)) for rid, x in zip(ids, inputs)]
            except BaseExceptionGroup as group:
                raise group.exceptions[0] from None
            return [t.result() for t in tasks]
        try:
            vectors = await unless_disconnected(raw, all_of())
        except ValueError as e:
            raise bad_request(e) from e
        except (EngineDeadError, RequestFailedError) as e:
            raise engine_error(e) from e
        n = sum(len(x) for x in inputs)
        data = [EmbeddingData(index=i, embedding=_encode(v, req.encoding_format))
                for i, v in enumerate(vectors)]
        return json_response(EmbeddingResponse(id=request_id, model=s.model_name, data=data,
                                               usage=EmbeddingUsage(prompt_tokens=n, total_tokens=n)))
