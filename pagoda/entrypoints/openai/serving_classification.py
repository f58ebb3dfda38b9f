"""POST /classify (vLLM's): class probabilities per input, with the label of the likeliest class
from the model config's id2label. Softmax over the labels; a one-label head gives its sigmoid;
`activation: false` returns the logits."""
from __future__ import annotations

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from .protocol import ClassificationData, ClassificationRequest, ClassificationResponse, UsageInfo
from .serving_base import OpenAIServing
from .streams import json_response


class ServingClassification:
    def __init__(self, serving: OpenAIServing):
        self.s = serving

    async def create(self, req: ClassificationRequest, raw: Request) -> Response:
        s = self.s
        s.require_route(req.model, "/classify")
        params = s.pooling_params(task="classify", activation=req.activation,
                                  truncate_prompt_tokens=req.truncate_prompt_tokens)
        request_id, outs, n = await s.pool_inputs(raw, req.input, req.add_special_tokens, params,
                                                  "classify")
        labels = s.engine.model_config.id2label
        data = []
        for i, o in enumerate(outs):
            probs = o.outputs.data
            data.append(ClassificationData(index=i, label=labels.get(int(np.argmax(probs))),
                                           probs=probs.tolist(), num_classes=len(probs)))
        return json_response(ClassificationResponse(id=request_id, model=s.model_name, data=data,
                                                    usage=UsageInfo(prompt_tokens=n, total_tokens=n)))
