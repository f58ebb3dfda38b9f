"""Offline batch API, shaped like vLLM's: LLM(model=...).generate(prompts, SamplingParams(...))."""
from __future__ import annotations

import itertools
import time
from typing import Optional, Sequence, Union

from pagoda.config import EngineArgs
from pagoda.engine.embedding_engine import EmbeddingEngine, EmbedPrompt, is_embedding_model
from pagoda.engine.engine import LLMEngine, PromptType
from pagoda.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from pagoda.sampling_params import SamplingParams

Conversation = list[dict]


def _prompt_list(prompts) -> list:
    """A single str / dict / token-id list is one prompt; anything else is a sequence of them."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                            and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


class LLM:
    """Load a model once, then generate for many prompts with continuous batching.

    `model=None` runs the bundled SmolLM2-135M-Instruct. Every engine flag is a keyword argument
    (max_model_len=..., gpu_memory_utilization=..., dtype=..., enable_prefix_caching=..., ...).
    An embedding model (BertModel) is detected from its config: it offers embed() only.
    """

    def __init__(self, model: Optional[str] = None, **kwargs):
        args = EngineArgs.from_kwargs(model=model, **kwargs)
        if is_embedding_model(args):
            self.engine = EmbeddingEngine(args)
        else:
            self.engine = LLMEngine(args)
            self.engine.stream_outputs = False  # only finished requests matter here
        self._ids = itertools.count()

    def _require_generative(self) -> None:
        if isinstance(self.engine, EmbeddingEngine):
            raise ValueError(f"{self.engine.model_config.model} is an embedding model: use "
                             "LLM.embed(), not generate()/chat()")

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Results come back in the order of `prompts`. A single str / token-id list is one prompt."""
        self._require_generative()
        prompts = _prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        # validate everything before anything runs, so one bad prompt fails the call cleanly
        ids = []
        try:
            for p, sp in zip(prompts, params):
                rid = str(next(self._ids))
                self.engine.add_request(rid, p, sp)
                ids.append(rid)
        except ValueError:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", unit="req", disable=not use_tqdm,
                   dynamic_ncols=True)
        t0 = time.time()
        out_toks = 0
        try:
            while self.engine.has_unfinished_requests():
                outputs = self.engine.step()
                if self.engine.failed:
                    rid, err = next(iter(self.engine.failed.items()))
                    self.engine.failed.clear()
                    raise RuntimeError(f"request {rid} failed in the engine: {err}") from err
                for out in outputs:
                    if out.finished:
                        done[out.request_id] = out
                        out_toks += sum(len(o.token_ids) for o in out.outputs)
                        bar.update(1)
                        bar.set_postfix_str(f"output {out_toks / max(time.time() - t0, 1e-9):.1f} tok/s")
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [done[r] for r in ids]

    def chat(self, messages: Union[Conversation, Sequence[Conversation]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = True, chat_template: Optional[str] = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: Optional[dict] = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them."""
        self._require_generative()
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.engine_chat_ids(c, chat_template, add_generation_prompt,
                                                            continue_final_message, chat_template_kwargs)}
                   for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def engine_chat_ids(self, conv, chat_template=None, add_generation_prompt=True,
                        continue_final_message=False, chat_template_kwargs=None) -> list[int]:
        from pagoda.inputs.chat_template import render_chat
        text = render_chat(self.engine.tokenizer, conv, chat_template, add_generation_prompt,
                           continue_final_message, **(chat_template_kwargs or {}))
        return self.engine.tokenizer(text, add_special_tokens=False).input_ids

    def embed(self, prompts: Union[EmbedPrompt, Sequence[EmbedPrompt]]) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (str, token-id list or {"prompt_token_ids": ...}), in order;
        every prompt is checked before any runs (ValueError naming the length on too long)."""
        if not isinstance(self.engine, EmbeddingEngine):
            raise ValueError(f"{self.engine.model_config.model} is a generative model: embed() needs "
                             "an embedding model (e.g. a BertModel checkpoint)")
        ids, vectors = self.engine.embed(_prompt_list(prompts))
        return [EmbeddingRequestOutput(str(next(self._ids)), EmbeddingOutput(v.tolist()), p)
                for p, v in zip(ids, vectors)]
