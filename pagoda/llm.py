"""Offline batch API, shaped like vLLM's: LLM(model=...).generate(prompts, SamplingParams(...)).

One engine serves every task: a generative model answers generate(), chat() and beam_search(); a
pooling model embed(), classify(), score() and encode() — all on the same engine core as
`pagoda serve`.
"""
from __future__ import annotations

import itertools
import time
from typing import Optional, Sequence, Union

from pagoda.config import EngineArgs
from pagoda.engine.llm_engine import LLMEngine
from pagoda.inputs.preprocess import PendingPrompt, PromptType
from pagoda.beam_search import BeamSearchOutput, BeamSearchParams
from pagoda.outputs import (ClassificationOutput, ClassificationRequestOutput, EmbeddingOutput,
                            EmbeddingRequestOutput, PoolingRequestOutput, RequestOutput, ScoringOutput,
                            ScoringRequestOutput)
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
        from pagoda.startup import first_start_gc
        args = EngineArgs.from_kwargs(model=model, **kwargs)
        with first_start_gc():
            self.llm_engine = LLMEngine(args)
        self.llm_engine.stream_outputs = False  # only finished requests matter here
        self._ids = itertools.count()
        from pagoda.inputs.media import MediaConnector
        self._media = MediaConnector.from_args(args)  # image URLs of chat() messages

    def shutdown(self) -> None:
        """Stop worker processes now (tensor-parallel ranks); they also stop when this process
        exits."""
        self.llm_engine.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def _require(self, pooling: bool, what: str) -> None:
        mc = self.llm_engine.model_config
        if mc.is_pooling != pooling:
            if mc.is_pooling:
                raise ValueError(f"{mc.model} is a pooling model: use LLM.embed(), classify(), score() "
                                 f"or encode(), not {what}()")
            raise ValueError(f"{mc.model} is a generative model: {what}() needs a pooling model (e.g. "
                             "a BertModel or ...ForSequenceClassification checkpoint, or --runner pooling)")

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
        """Hand every prompt to the engine and step it until all are done. A prompt is
        validated when it is added; one that fails aborts the call's requests and raises, so a
        call never returns part of its batch. Prompts with images reach the engine as their
        images come out of the processor pool, while the engine already runs the first ones."""
        from concurrent.futures import ThreadPoolExecutor
        from tqdm import tqdm
        eng = self.llm_engine
        pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pagoda-images")
        entries = eng.processor.prepare_images(prompts, pool)
        ids: list[str] = []
        done: dict[str, object] = {}
        bar = tqdm(total=len(entries), desc=desc, unit="req", disable=not use_tqdm, dynamic_ncols=True)
        t0 = time.time()
        out_toks = 0
        try:
            while len(ids) < len(entries) or eng.has_unfinished_requests():
                # add each prompt that is ready, in order; wait only when the engine is idle
                while len(ids) < len(entries):
                    e = entries[len(ids)]
                    if isinstance(e, PendingPrompt):
                        if not e.done() and eng.has_unfinished_requests():
                            break
                        e = e.result()
                    rid = str(next(self._ids))
                    eng.add_request(rid, e, params[len(ids)])
                    ids.append(rid)
                if not eng.has_unfinished_requests():
                    continue
                outputs = eng.step()
                if eng.output_processor.failed:
                    op = eng.output_processor
                    rid, err = next(iter(op.failed.items()))
                    invalid = rid in op.invalid
                    op.failed.clear()
                    op.invalid.clear()
                    if invalid:  # the request's own: its grammar compiled too long
                        raise ValueError(err)
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
            pool.shutdown(wait=False, cancel_futures=True)
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

    # -- pooling --------------------------------------------------------------------------------
    def _pool(self, prompts: list, pooling_params, task: str, truncate_prompt_tokens: Optional[int],
              use_tqdm: bool, desc: str) -> list[PoolingRequestOutput]:
        """One pooling request per prompt; `pooling_params` is one PoolingParams for all, or one
        per prompt (their task is set to `task`)."""
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            params = [pooling_params or PoolingParams(task=task)] * len(prompts)
        else:
            params = list(pooling_params)
            if len(params) != len(prompts):
                raise ValueError(f"pooling_params: {len(params)} given for {len(prompts)} prompts")
        changes = {"task": task}
        if truncate_prompt_tokens is not None:
            changes["truncate_prompt_tokens"] = truncate_prompt_tokens
        params = [p.clone(**changes) for p in params]
        return self._run(prompts, params, use_tqdm, desc)

    def encode(self, prompts: Union[PromptType, Sequence[PromptType]],
               pooling_params: Union[PoolingParams, Sequence[PoolingParams], None] = None,
               use_tqdm: bool = False, *, truncate_prompt_tokens: Optional[int] = None,
               pooling_task: Optional[str] = None) -> list[PoolingRequestOutput]:
        """The pooler's output per prompt, in order (vLLM's LLM.encode): `pooling_task` (or the
        params' task; default encode = the raw pooled vector or class logits)."""
        self._require(True, "encode")
        if pooling_task is None:
            pooling_task = pooling_params.task if isinstance(pooling_params, PoolingParams) else "encode"
        return self._pool(_prompt_list(prompts), pooling_params, pooling_task, truncate_prompt_tokens,
                          use_tqdm, "Pooled prompts")

    def embed(self, prompts: Union[PromptType, Sequence[PromptType]], use_tqdm: bool = False, *,
              truncate_prompt_tokens: Optional[int] = None,
              pooling_params: Union[PoolingParams, Sequence[PoolingParams], None] = None
              ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (str, token-id list or {"prompt_token_ids": ...}), in order;
        every prompt is checked before any runs (ValueError naming the length on too long)."""
        self._require(True, "embed")
        outs = self._pool(_prompt_list(prompts), pooling_params, "embed", truncate_prompt_tokens,
                          use_tqdm, "Embedded prompts")
        return [EmbeddingRequestOutput(o.request_id, EmbeddingOutput(o.outputs.data.tolist()),
                                       o.prompt_token_ids) for o in outs]

    def classify(self, prompts: Union[PromptType, Sequence[PromptType]], use_tqdm: bool = False, *,
                 truncate_prompt_tokens: Optional[int] = None,
                 pooling_params: Union[PoolingParams, Sequence[PoolingParams], None] = None
                 ) -> list[ClassificationRequestOutput]:
        """Class probabilities per prompt (softmax; sigmoid for a one-label head), in order; the
        labels are `llm.llm_engine.model_config.id2label`."""
        self._require(True, "classify")
        outs = self._pool(_prompt_list(prompts), pooling_params, "classify", truncate_prompt_tokens,
                          use_tqdm, "Classified prompts")
        return [ClassificationRequestOutput(o.request_id, ClassificationOutput(o.outputs.data.tolist()),
                                            o.prompt_token_ids) for o in outs]

    def score(self, data_1: Union[str, Sequence[str]], data_2: Union[str, Sequence[str]], /, *,
              truncate_prompt_tokens: Optional[int] = None, use_tqdm: bool = False,
              pooling_params: Optional[PoolingParams] = None) -> list[ScoringRequestOutput]:
        """Scores of text pairs: data_1 against each of data_2 (1 -> 1, 1 -> N) or pairwise
        (N -> N). A cross-encoder (one-label classifier) reads each pair as one input and gives
        the sigmoid of its logit; an embedding model gives the cosine of the two embeddings."""
        from pagoda.inputs.score import cosine, distinct, score_pairs
        self._require(True, "score")
        pairs = score_pairs(data_1, data_2, ("data_1", "data_2"))
        eng = self.llm_engine
        params = pooling_params or PoolingParams()
        if eng.model_config.pooling_kind == "classify":
            eng.processor.pooling_params(params.clone(task="score"))  # a one-label head, or ValueError
            prompts = [eng.processor.encode_pair(a, b) for a, b in pairs]
            outs = self._pool(prompts, params, "score", truncate_prompt_tokens, use_tqdm, "Scored pairs")
            return [ScoringRequestOutput(o.request_id, ScoringOutput(float(o.outputs.data[0])),
                                         o.prompt_token_ids) for o in outs]
        texts = distinct(pairs)
        embedded = dict(zip(texts, self._pool(texts, params, "embed", truncate_prompt_tokens, use_tqdm,
                                              "Embedded texts")))
        out = []
        for a, b in pairs:
            ea, eb = embedded[a], embedded[b]
            out.append(ScoringRequestOutput(f"{ea.request_id}_{eb.request_id}",
                                            ScoringOutput(cosine(ea.outputs.data, eb.outputs.data)),
                                            ea.prompt_token_ids + eb.prompt_token_ids))
        return out

    # -- beam search ------------------------------------------------------------------------------
    def beam_search(self, prompts: Union[PromptType, Sequence[PromptType]], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's beam search: the beam_width best continuations of each prompt (str, token ids,
        {"prompt": ...} or {"prompt_token_ids": ...}), best first, scored by summed logprob
        over length ** length_penalty. Needs 2 * beam_width <= --max-logprobs."""
        from tqdm import tqdm
        from pagoda.beam_search import beam_search
        self._require(False, "beam_search")
        eng = self.llm_engine
        if 2 * params.beam_width > eng.args.max_logprobs:
            raise ValueError(f"beam_width: {params.beam_width} needs {2 * params.beam_width} logprobs per "
                             f"step, more than --max-logprobs {eng.args.max_logprobs}")
        ids = []
        for p in _prompt_list(prompts):
            _, toks, _ = eng.processor.tokenize(p)
            eng.processor.check_prompt(toks, pooling=False)
            ids.append(toks)
        tok = eng.tokenizer
        bar = tqdm(total=params.max_tokens, desc="Beam search", unit="step", disable=not use_tqdm)
        try:
            return beam_search(
                lambda batch, sp: self.generate(batch, sp, use_tqdm=False),
                lambda k, temperature: SamplingParams(max_tokens=1, logprobs=k, temperature=temperature,
                                                      ignore_eos=params.ignore_eos),
                ids, params, set(eng.model_config.eos_token_ids), eng.model_config.max_model_len,
                (lambda t: tok.decode(t, skip_special_tokens=True)) if tok is not None else None,
                lambda: bar.update(1))
        finally:
            bar.close()
