"""POST /score, /v1/score (vLLM's) and /rerank, /v1/rerank, /v2/rerank (Jina's and Cohere's).

Both score text pairs (`pagoda.inputs.score`): a cross-encoder (a classifier with one label)
reads each pair as one input and answers the sigmoid of its logit; an embedding model embeds
each distinct text once and answers the cosine of the two vectors. /score pairs text_1 with
text_2 (1 -> 1, 1 -> N, N -> N); /rerank scores the query against every document and returns
them best first, the top_n of them, with their texts unless return_documents is false.
`usage` counts the tokens the engine read (a bi-encoder reads a repeated text once).
"""
from __future__ import annotations

from typing import Optional

from starlette.requests import Request
from starlette.responses import Response

from pagoda.inputs.score import cosine, distinct, score_pairs

from .protocol import (RerankRequest, RerankResponse, RerankResult, RerankResultDocument, RerankUsage,
                       ScoreData, ScoreRequest, ScoreResponse, UsageInfo)
from .serving_base import OpenAIServing, bad_request, check_count, random_id
from .streams import json_response


class ServingScore:
    def __init__(self, serving: OpenAIServing):
        self.s = serving

    async def _scores(self, raw: Request, pairs: list[tuple[str, str]], names: tuple[str, str],
                      truncate: Optional[int], activation: Optional[bool], request_id: str
                      ) -> tuple[list[float], int]:
        """(one score per pair, tokens read)."""
        s = self.s
        check_count(len(pairs), names[1], "pairs")
        if s.engine.model_config.pooling_kind == "classify":  # a cross-encoder: one input a pair
            s.admit(raw, len(pairs), names[1])  # one engine request a pair, before tokenizing
            params = s.pooling_params(task="score", activation=activation, truncate_prompt_tokens=truncate)
            prompts = [await s.encode_pair(a, b, names) for a, b in pairs]
            s.check_pooling(prompts, params, names[1])
            outs = await s.pool(raw, prompts, params, request_id)
            return [float(o.outputs.data[0]) for o in outs], sum(len(o.prompt_token_ids) for o in outs)
        params = s.pooling_params(task="embed", truncate_prompt_tokens=truncate)
        texts = distinct(pairs)
        firsts = {a for a, _ in pairs}
        s.admit(raw, len(texts), names[1])
        fields = [names[0] if t in firsts else names[1] for t in texts]
        prompts = [{"prompt_token_ids": await s.encode(t, param=f)} for t, f in zip(texts, fields)]
        s.check_pooling(prompts, params, fields)
        outs = dict(zip(texts, await s.pool(raw, prompts, params, request_id)))
        return ([cosine(outs[a].outputs.data, outs[b].outputs.data) for a, b in pairs],
                sum(len(o.prompt_token_ids) for o in outs.values()))

    async def score(self, req: ScoreRequest, raw: Request) -> Response:
        s = self.s
        s.require_route(req.model, "/score")
        try:
            pairs = score_pairs(req.text_1, req.text_2)
        except ValueError as e:
            raise bad_request(e) from e
        request_id = random_id("score")
        scores, n = await self._scores(raw, pairs, ("text_1", "text_2"), req.truncate_prompt_tokens,
                                       req.activation, request_id)
        return json_response(ScoreResponse(id=request_id, model=s.model_name,
                                           data=[ScoreData(index=i, score=v) for i, v in enumerate(scores)],
                                           usage=UsageInfo(prompt_tokens=n, total_tokens=n)))

    async def rerank(self, req: RerankRequest, raw: Request) -> Response:
        s = self.s
        s.require_route(req.model, "/rerank")
        docs = [d if isinstance(d, str) else d.text for d in req.documents]
        try:
            pairs = score_pairs(req.query, docs, ("query", "documents"))
        except ValueError as e:
            raise bad_request(e) from e
        request_id = random_id("rerank")
        scores, n = await self._scores(raw, pairs, ("query", "documents"), req.truncate_prompt_tokens,
                                       None, request_id)
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[:req.top_n or len(docs)]
        results = [RerankResult(index=i, relevance_score=scores[i],
                                document=RerankResultDocument(text=docs[i]) if req.return_documents else None)
                   for i in order]
        return json_response(RerankResponse(id=request_id, model=s.model_name,
                                            usage=RerankUsage(total_tokens=n), results=results))
