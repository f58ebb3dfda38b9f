"""Offline batch API, shaped like vLLM's: LLM(model=...).generate(prompts, SamplingParams(...)).

One engine serves every task: a generative model answers generate() and chat(), an embedding
model (BertModel) embed() and encode() — both run on the same engine core as `pagoda serve`.
"""
from __future__ import annotations

import itertools
import time
from typing import Optional, Sequence, Union

from pagoda.config import EngineArgs
from pagoda.engine.llm_engine import LLMEngine
from pagoda.inputs.preprocess import PromptType
from pagoda.outputs import (EmbeddingOutput, EmbeddingRequestOutput, PoolingRequestOutput,
                            RequestOutput)
from pagoda.pooling_params import PoolingParams
from pagoda.sampling_params import SamplingParams

Conversation = list[dict]


def _prompt_list(prompts) -> list:
    """A single str / dict / token-id list is one prompt; anything else is a sequence of them."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                            and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


class LLM:
    """Load a model once, then run many prompts with continuous batching.

    `model=None` runs the bundled SmolLM2-135M-Instruct. Every engine flag is a keyword argument
    (max_model_len=..., gpu_memory_utilization=..., dtype=..., enable_prefix_caching=..., ...).
    """

    def __init__(self, model: Optional[str] = None, **kwargs):
        args = EngineArgs.from_kwargs(model=model, **kwargs)
        self.llm_engine = LLMEngine(args)
        self.llm_engine.stream_outputs = False  # only finished requests matter here
        self._ids = itertools.count()
        from pagoda.inputs.media import MediaConnector
        self._media = MediaConnector.from_args(args)  # image URLs of chat() messages

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def _require(self, pooling: bool, what: str) -> None:
        mc = self.llm_engine.model_config
        if mc.is_pooling != pooling:
            if mc.is_pooling:
                raise ValueError(f"{mc.model} is an embedding model: use LLM.embed(), not {what}()")
            raise ValueError(f"{mc.model} is a generative model: {what}() needs an embedding model "
                             "(e.g. a BertModel checkpoint)")

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Results come back in the order of `prompts`. A single str / token-id list is one prompt."""
        self._require(False, "generate")
        prompts = _prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        return self._run(prompts, params, use_tqdm, "Processed prompts")

    def _run(self, prompts: list, params: list, use_tqdm: bool, desc: str) -> list:
        from tqdm import tqdm
        eng = self.llm_engine
        prompts = eng.processor.prepare_images(prompts)  # images: preprocessed in parallel
        ids = []
        try:  # validate everything before anything runs, so one bad prompt fails the call cleanly
            for p, sp in zip(prompts, params):
                rid = str(next(self._ids))
                eng.add_request(rid, p, sp)
                ids.append(rid)
        except ValueError:
            for rid in ids:
                eng.abort_request(rid)
            raise
        done: dict[str, object] = {}
        bar = tqdm(total=len(ids), desc=desc, unit="req", disable=not use_tqdm, dynamic_ncols=True)
        t0 = time.time()
        out_toks = 0
        try:
            while eng.has_unfinished_requests():
                outputs = eng.step()
                if eng.output_processor.failed:
                    rid, err = next(iter(eng.output_processor.failed.items()))
                    eng.output_processor.failed.clear()
                    raise RuntimeError(f"request {rid} failed in the engine: {err}")
                for out in outputs:
                    done[out.request_id] = out
                    if isinstance(out, RequestOutput):
                        out_toks += sum(len(o.token_ids) for o in out.outputs)
                    bar.update(1)
                    bar.set_postfix_str(f"output {out_toks / max(time.time() - t0, 1e-9):.1f} tok/s")
        except BaseException:
            for rid in ids:
                eng.abort_request(rid)
            raise
        finally:
            bar.close()
        return [done[r] for r in ids]

    def chat(self, messages: Union[Conversation, Sequence[Conversation]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = True, chat_template: Optional[str] = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: Optional[dict] = None, tools: Optional[list] = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them. With a
        vision-language model, content parts {"type": "image_url", "image_url": {"url": ...}}
        (data:, http(s): or, under allowed_local_media_path, file: URLs) bring images."""
        self._require(False, "chat")
        from pagoda.inputs.chat_template import image_urls, render_chat
        tok = self.llm_engine.tokenizer
        mm = self.llm_engine.processor.mm_processor
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in convs:
            text = render_chat(tok, conv, chat_template, add_generation_prompt, continue_final_message,
                               tools=tools, multimodal=mm is not None, **(chat_template_kwargs or {}))
            urls = image_urls(conv) if mm is not None else []
            if urls:
                mm.check_count(len(urls), "messages")
                images = [self._media.decode(self._media.fetch_sync(url), url) for _, url in urls]
                _, ids, feats = mm.process(text, images, add_special_tokens=False, field="messages")
                prompts.append({"prompt_token_ids": ids, "mm_features": feats})
            else:
                prompts.append({"prompt_token_ids": tok(text, add_special_tokens=False).input_ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def encode(self, prompts: Union[PromptType, Sequence[PromptType]],
               pooling_params: Optional[PoolingParams] = None,
               use_tqdm: bool = False) -> list[PoolingRequestOutput]:
        """Pooled hidden states, one per prompt, in order (vLLM's LLM.encode)."""
        self._require(True, "encode")
        prompts = _prompt_list(prompts)
        params = pooling_params or PoolingParams(task="encode")
        return self._run(prompts, [params] * len(prompts), use_tqdm, "Pooled prompts")

    def embed(self, prompts: Union[PromptType, Sequence[PromptType]],
              use_tqdm: bool = False) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (str, token-id list or {"prompt_token_ids": ...}), in order;
        every prompt is checked before any runs (ValueError naming the length on too long)."""
        self._require(True, "embed")
        outs = self._run(_prompt_list(prompts), [PoolingParams(task="embed")] * len(_prompt_list(prompts)),
                         use_tqdm, "Embedded prompts")
        return [EmbeddingRequestOutput(o.request_id, EmbeddingOutput(o.outputs.data.tolist()),
                                       o.prompt_token_ids) for o in outs]
