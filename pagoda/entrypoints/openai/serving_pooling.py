"""POST /pooling (vLLM's): the pooler's raw output per input — an embedding model's pooled vector
(normalized as the model says, unless `normalize`), a classifier's logits (probabilities with
`activation`). Inputs as /v1/embeddings takes them; `encoding_format` float or base64."""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from .protocol import PoolingData, PoolingRequest, PoolingResponse, UsageInfo
from .serving_base import OpenAIServing
from .serving_embedding import encode_vector
from .streams import json_response


class ServingPooling:
    def __init__(self, serving: OpenAIServing):
        self.s = serving

    async def create(self, req: PoolingRequest, raw: Request) -> Response:
        s = self.s
        s.require_route(req.model, "/pooling")
        params = s.pooling_params(task="encode", dimensions=req.dimensions, normalize=req.normalize,
                                  activation=req.activation,
                                  truncate_prompt_tokens=req.truncate_prompt_tokens)
        request_id, outs, n = await s.pool_inputs(raw, req.input, req.add_special_tokens, params, "pool")
        data = [PoolingData(index=i, data=encode_vector(o.outputs.data, req.encoding_format))
                for i, o in enumerate(outs)]
        return json_response(PoolingResponse(id=request_id, model=s.model_name, data=data,
                                             usage=UsageInfo(prompt_tokens=n, total_tokens=n)))
