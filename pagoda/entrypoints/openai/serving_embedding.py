"""POST /v1/embeddings: one vector per input (string, strings, token ids, token-id lists).

Text is tokenized on the server's tokenizer thread (so ``usage`` is the tokenizer's exact count);
the vectors come from the embedding engine's worker thread, batched with other requests.
``encoding_format: "base64"`` packs each vector as little-endian float32, as OpenAI does.
"""
from __future__ import annotations

import base64

import numpy as np
import torch
from starlette.requests import Request
from starlette.responses import Response

from pagoda.engine.async_embedding_engine import AsyncEmbeddingEngine

from .errors import OpenAIError
from .protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from .serving_base import OpenAIServing, bad_request, check_count, random_id
from .streams import json_response, unless_disconnected

GENERATION_ONLY = ("The model `{name}` is a generative model: it does not serve /v1/embeddings. "
                   "Start `pagoda serve` with an embedding model (e.g. a BertModel checkpoint).")


def _encode(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


class ServingEmbedding:
    def __init__(self, serving: OpenAIServing):
        self.s = serving
        engine = serving.engine
        self.engine = engine if isinstance(engine, AsyncEmbeddingEngine) else None

    async def _inputs(self, req: EmbeddingRequest) -> list[list[int]]:
        items = req.input
        if isinstance(items, str) or (items and isinstance(items[0], int)):
            items = [items]
        if not items:
            raise OpenAIError("input must not be empty.", param="input")
        check_count(len(items), "input", "inputs")
        inputs = []
        for i, item in enumerate(items):
            if not item:
                raise OpenAIError(f"input: item {i} is empty; every input needs at least one "
                                  "character or token.", param="input")
            if isinstance(item, str):
                inputs.append(await self.s.encode(item, add_special_tokens=req.add_special_tokens,
                                                  param="input"))
            else:
                self.s.check_token_ids(item, "input")
                inputs.append(list(item))
        return inputs

    async def create(self, req: EmbeddingRequest, raw: Request) -> Response:
        s = self.s
        s.check_model(req.model)
        if self.engine is None:
            raise OpenAIError(GENERATION_ONLY.format(name=s.model_name), param="model",
                              code="unsupported")
        size = self.engine.embedding_size
        if req.dimensions is not None and req.dimensions != size:
            raise OpenAIError(f"dimensions: {req.dimensions} requested, but this model only returns "
                              f"{size}-dimensional embeddings (omit dimensions or pass {size}).",
                              param="dimensions")
        inputs = await self._inputs(req)
        s.check_engine()
        try:
            vectors = await unless_disconnected(raw, self.engine.embed(inputs))
        except ValueError as e:
            raise bad_request(e) from e
        n = sum(len(ids) for ids in inputs)
        data = [EmbeddingData(index=i, embedding=_encode(v, req.encoding_format))
                for i, v in enumerate(vectors)]
        return json_response(EmbeddingResponse(id=random_id("embd"), model=s.model_name, data=data,
                                               usage=EmbeddingUsage(prompt_tokens=n, total_tokens=n)))
