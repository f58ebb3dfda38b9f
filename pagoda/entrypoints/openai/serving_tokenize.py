"""POST /tokenize and /detokenize (vLLM's extension): the exact ids a prompt becomes, and back."""
from __future__ import annotations

from .protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest, TokenizeRequest,
                       TokenizeResponse)
from .serving_base import OpenAIServing


class ServingTokenize:
    def __init__(self, serving: OpenAIServing):
        self.s = serving

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        s = self.s
        s.check_model(req.model)
        if isinstance(req, TokenizeChatRequest):
            ids = await s.chat_prompt_ids(req.messages, req.add_generation_prompt,
                                          req.continue_final_message, req.chat_template,
                                          req.chat_template_kwargs, req.tools,
                                          add_special_tokens=req.add_special_tokens)
        else:
            ids = await s.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        strs = await s.token_strs(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=s.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.s.check_model(req.model)
        self.s.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=await self.s.decode(req.tokens))
