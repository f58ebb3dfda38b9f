"""POST /v1/embeddings: one vector per input (string, strings, token ids, token-id lists).

Text is tokenized on the server's tokenizer thread (so ``usage`` is the tokenizer's exact count);
each input is one pooling request on the engine core, batched with everyone else's requests
like generation is, and aborted if the client goes away (`OpenAIServing.pool`).
``encoding_format: "base64"`` packs each vector as little-endian float32, as OpenAI does;
``dimensions`` truncates Matryoshka models' vectors; vLLM's ``truncate_prompt_tokens`` keeps the
last k tokens of each input.
"""
from __future__ import annotations

import base64

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from .protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from .serving_base import OpenAIServing
from .streams import json_response


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


class ServingEmbedding:
    def __init__(self, serving: OpenAIServing):
        self.s = serving

    async def create(self, req: EmbeddingRequest, raw: Request) -> Response:
        s = self.s
        s.require_route(req.model, "/v1/embeddings")
        params = s.pooling_params(task="embed", dimensions=req.dimensions,
                                  truncate_prompt_tokens=req.truncate_prompt_tokens)
        request_id, outs, n = await s.pool_inputs(raw, req.input, req.add_special_tokens, params, "embd")
        data = [EmbeddingData(index=i, embedding=encode_vector(o.outputs.data, req.encoding_format))
                for i, o in enumerate(outs)]
        return json_response(EmbeddingResponse(id=request_id, model=s.model_name, data=data,
                                               usage=EmbeddingUsage(prompt_tokens=n, total_tokens=n)))
