"""Prompts -> engine-core requests: tokenizing (for text prompts) and validation, in one place.

Everything a request can get wrong is checked here, in the front end, before the request
reaches the engine core: an empty prompt, token ids outside the vocabulary, a prompt or
prompt + max_tokens longer than max_model_len, more logprobs than --max-logprobs, a structured-
outputs schema or grammar that does not parse, allowed_token_ids outside the vocabulary (bad
words are tokenized here, for the sampler to match), a pooling task or `dimensions` the model does not
serve, images for a text-only model or more than --limit-mm-per-prompt. A request with n > 1
samples becomes n engine-core requests (ids "<id>#<i>") of one sample each. A pooling prompt is
cut to its last `truncate_prompt_tokens` tokens (vLLM's rule) before the length check.

Images come as vLLM's {"prompt": "...<image>...", "multi_modal_data": {"image": PIL image or
list}} (or "prompt_token_ids" with the image token), processed here by the model's
MultiModalProcessor; or already processed ({"prompt_token_ids", "mm_features"}: the API
server prepares them off its event loop).
An encoder-decoder (Whisper) prompt carries its audio instead: `{"prompt" |
"prompt_token_ids": the decoder prompt (default <|startoftranscript|><|en|><|transcribe|>
<|notimestamps|>), "multi_modal_data": {"audio": (waveform, sample rate)}}` (vLLM's shape; at
most 30 s), or `"encoder_features"` already computed (the transcription endpoints' way).
"""
from __future__ import annotations

import time
from typing import Any, Optional, Union

from pagoda.config import ModelConfig
from pagoda.engine.messages import EngineCoreRequest, MultiModalFeature, Tensor
from pagoda.pooling_params import PoolingParams
from pagoda.sampling_params import SamplingParams
from pagoda.structured_output.grammar import validate_structured_outputs

PromptType = Union[str, list[int], dict]
# bad_words: each one's token sequences are matched against every row's output every step
MAX_BAD_WORDS = 1024
MAX_BAD_WORD_TOKENS = 64
# a prompt dict's images after the image processor (set by prepare_images, read by process)
PREPARED_IMAGES = "_prepared_images"


class PendingPrompt:
    """Prompt j of a chunk the image pool is processing: a Future's view of one prompt."""
    __slots__ = ("task", "j")

    def __init__(self, task, j: int):
        self.task, self.j = task, j

    def done(self) -> bool:
        return self.task.done()

    def result(self):
        return self.task.result()[self.j]


def child_ids(request_id: str, n: int) -> list[str]:
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


class InputProcessor:
    def __init__(self, model_config: ModelConfig, tokenizer: Optional[Any], max_logprobs: int,
                 mm_processor: Optional[Any] = None, audio: Optional[Any] = None):
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.max_logprobs = max_logprobs
        self.mm_processor = mm_processor  # inputs.multimodal.MultiModalProcessor (vision models)
        self.audio = audio  # inputs.audio.AudioProcessor of an encoder-decoder (Whisper) model

    def multimodal(self, prompt: dict) -> tuple[Optional[str], list[int], list[MultiModalFeature]]:
        """(text, token ids, features) of a prompt that carries images."""
        mm = self.mm_processor
        if mm is None:
            raise ValueError(f"multi_modal_data: {self.model_config.model} is a text-only model; it "
                             "takes no images")
        if "mm_features" in prompt:  # processed by the API server
            feats = list(prompt["mm_features"] or [])
            mm.check_count(len(feats))
            return prompt.get("prompt"), list(prompt["prompt_token_ids"]), feats
        from pagoda.inputs.multimodal import image_list
        data = prompt.get("multi_modal_data") or {}
        unknown = sorted(set(data) - {"image"})
        if unknown:
            raise ValueError(f"multi_modal_data: unsupported modality {unknown[0]!r} (supported: image)")
        images = image_list(data.get("image", []))
        items = prompt.get(PREPARED_IMAGES)
        if "prompt_token_ids" in prompt:
            return mm.process(list(prompt["prompt_token_ids"]), images, items=items)
        if self.tokenizer is None:
            raise ValueError("prompt: text prompts need a tokenizer (started with --skip-tokenizer-init)")
        return mm.process(prompt["prompt"], images, items=items)

    def prepare_images(self, prompts: list, pool, chunk: int = 16) -> list:
        """Start the image processor on the prompts that carry images, `chunk` prompts per task
        on `pool` (threads: the processors' numpy, PIL and torch work runs without the GIL).
        One entry per prompt: the prompt itself, or a PendingPrompt of it with its images
        prepared, so the offline LLM can hand the first prompts to the engine while the rest are
        still processed. A prompt whose images fail keeps them unprocessed (process() reports
        it)."""
        mm = self.mm_processor
        todo = [i for i, p in enumerate(prompts) if isinstance(p, dict) and p.get("multi_modal_data")]
        if mm is None or len(todo) < 2:
            return list(prompts)
        from pagoda.inputs.multimodal import image_list

        def run(group):
            out = []
            for i in group:
                try:
                    items = mm.process_images(image_list(prompts[i]["multi_modal_data"].get("image", [])))
                    out.append({**prompts[i], PREPARED_IMAGES: items})
                except ValueError:
                    out.append(prompts[i])
            return out
        entries: list = list(prompts)
        for k in range(0, len(todo), chunk):
            group = todo[k:k + chunk]
            task = pool.submit(run, group)
            for j, i in enumerate(group):
                entries[i] = PendingPrompt(task, j)
        return entries

    def tokenize(self, prompt: PromptType, field: str = "prompt") -> tuple[Optional[str], list[int],
                                                                            Optional[list[int]]]:
        """(text, token ids, token type ids) of a prompt: a string, token ids, or a dict with
        "prompt_token_ids" (and optionally "prompt" / "token_type_ids") or "prompt"."""
        types = None
        if isinstance(prompt, dict):
            types = prompt.get("token_type_ids")
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"]), types
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{field}: text prompts need a tokenizer (started with "
                                 "--skip-tokenizer-init); send token ids")
            # a Whisper decoder prompt is written out whole (its tokenizer would add its own prefix)
            enc = self.tokenizer(prompt, add_special_tokens=self.audio is None)
            if self.model_config.uses_token_type_ids and "token_type_ids" in enc:
                types = list(enc["token_type_ids"])
            return prompt, list(enc.input_ids), types
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                     for t in prompt):
            return None, list(prompt), types
        raise ValueError(f"{field}: must be a string or a list of token ids")

    def encode_pair(self, text_1: str, text_2: str, add_special_tokens: bool = True,
                    tokenizer: Optional[Any] = None) -> dict:
        """A text pair as one prompt, as a cross-encoder reads it: the tokenizer's pair encoding
        ([CLS] a [SEP] b [SEP] with token types 0 / 1 for BERT, <s> a </s></s> b </s> for XLM-R,
        plain concatenation for decoder tokenizers). `tokenizer`: a copy of this one, for a
        caller on another thread (HF fast tokenizers must not be shared between threads)."""
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise ValueError("text_1: text pairs need a tokenizer (started with --skip-tokenizer-init)")
        enc = tokenizer(text_1, text_pair=text_2, add_special_tokens=add_special_tokens)
        prompt = {"prompt_token_ids": list(enc.input_ids)}
        if self.model_config.uses_token_type_ids and "token_type_ids" in enc:
            prompt["token_type_ids"] = list(enc["token_type_ids"])
        return prompt

    def pooling_params(self, params: PoolingParams) -> PoolingParams:
        """Refuse what the model cannot compute (ValueError naming the field)."""
        mc = self.model_config
        tasks = mc.supported_tasks
        if params.task not in tasks:
            why = (" (a score needs a cross-encoder with one label, or an embedding model)"
                   if params.task == "score" else "")
            raise ValueError(f"task: {mc.model} does not serve {params.task!r}{why}; it serves "
                             f"{', '.join(tasks)}")
        d = params.dimensions
        if d is not None and d != mc.embedding_size:
            size = mc.embedding_size
            if mc.pooling_kind != "embed":
                raise ValueError(f"dimensions: {mc.model} is not an embedding model")
            if mc.matryoshka_dimensions is None:
                raise ValueError(f"dimensions: {mc.model} does not support Matryoshka embeddings; it "
                                 f"returns {size}-dimensional embeddings only (omit dimensions or pass "
                                 f"{size})")
            if d > size or (mc.matryoshka_dimensions and d not in mc.matryoshka_dimensions):
                sizes = mc.matryoshka_dimensions or f"1..{size}"
                raise ValueError(f"dimensions: {d} is not one of {mc.model}'s sizes ({sizes})")
        t = params.truncate_prompt_tokens
        if t is not None and t > mc.max_model_len:
            raise ValueError(f"truncate_prompt_tokens: {t} is greater than max_model_len "
                             f"({mc.max_model_len}); use -1 for max_model_len")
        return params

    def truncate(self, ids: list[int], types: Optional[list[int]], params: PoolingParams):
        """The last truncate_prompt_tokens tokens (-1: max_model_len) of a pooling prompt."""
        t = params.truncate_prompt_tokens
        if t is None:
            return ids, types
        k = self.model_config.max_model_len if t == -1 else t
        return ids[-k:], (types[-k:] if types else types)

    def check_prompt(self, ids: list[int], pooling: bool, field: str = "prompt") -> None:
        mc = self.model_config
        if not ids:
            raise ValueError(f"{field}: must not be empty")
        bad = next((t for t in ids if not 0 <= t < mc.vocab_size), None)
        if bad is not None:
            raise ValueError(f"{field}: token id {bad} is outside the vocabulary (0..{mc.vocab_size - 1})")
        if pooling:
            if len(ids) > mc.max_model_len:
                raise ValueError(f"{field}: {len(ids)} tokens, but this model's maximum context length "
                                 f"(max_model_len) is {mc.max_model_len}; shorten it")
        elif len(ids) >= mc.max_model_len:
            raise ValueError(f"{field}: {len(ids)} tokens, but max_model_len is {mc.max_model_len} "
                             f"(the prompt must leave room for at least one output token)")

    def sampling_params(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        mc = self.model_config
        if params.max_tokens is not None and prompt_len + params.max_tokens > mc.max_model_len:
            raise ValueError(f"max_tokens: {params.max_tokens} output tokens + {prompt_len} prompt tokens "
                             f"exceed max_model_len {mc.max_model_len}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(params, name)
            if v is not None and v > self.max_logprobs:
                raise ValueError(f"{name}: {v} requested, but at most --max-logprobs "
                                 f"{self.max_logprobs} are allowed")
        if params.structured_outputs is not None:  # a schema/grammar that does not parse: caller's error
            validate_structured_outputs(params.structured_outputs)
        bad = next((t for t in params.allowed_token_ids or () if not 0 <= t < mc.vocab_size), None)
        if bad is not None:
            raise ValueError(f"allowed_token_ids: token id {bad} is outside the vocabulary "
                             f"(0..{mc.vocab_size - 1})")
        changes = {}
        if params.bad_words:
            changes["bad_words_token_ids"] = self.bad_words_token_ids(params.bad_words)
        return params.clone(eos_token_ids=mc.eos_token_ids,
                            max_tokens=params.max_tokens or mc.max_model_len - prompt_len, **changes)

    def bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word's token sequences, as vLLM makes them: the word alone (as it would start
        the output), and with a leading space (inside a text) when that is a different first
        token with the same number of tokens."""
        if len(words) > MAX_BAD_WORDS:
            raise ValueError(f"bad_words: {len(words)} given, at most {MAX_BAD_WORDS} are allowed")
        if self.tokenizer is None:
            raise ValueError("bad_words: need a tokenizer (started with --skip-tokenizer-init); "
                             "use logit_bias or allowed_token_ids")
        seqs: list[list[int]] = []
        for word in words:
            word = word.lstrip()
            alone = list(self.tokenizer(word, add_special_tokens=False).input_ids)
            spaced = list(self.tokenizer(" " + word, add_special_tokens=False).input_ids)
            if len(alone) > MAX_BAD_WORD_TOKENS:
                raise ValueError(f"bad_words: {word[:40]!r} is {len(alone)} tokens, at most "
                                 f"{MAX_BAD_WORD_TOKENS} are allowed")
            for ids in (alone, spaced):
                if ids is spaced and (not alone or ids[0] == alone[0] or len(ids) != len(alone)):
                    continue
                if ids and ids not in seqs:
                    seqs.append(ids)
        vocab = self.model_config.vocab_size
        bad = next((t for ids in seqs for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"bad_words: token id {bad} is outside the vocabulary (0..{vocab - 1})")
        return seqs

    def process(self, request_id: str, prompt: PromptType,
                params: Union[SamplingParams, PoolingParams],
                arrival_time: Optional[float] = None) -> tuple[Optional[str], list[int], list[EngineCoreRequest]]:
        """(prompt text, prompt ids, engine-core requests) or ValueError naming the field."""
        arrival = arrival_time or time.time()
        pooling = isinstance(params, PoolingParams)
        if pooling != self.model_config.is_pooling:
            kind = "a pooling" if self.model_config.is_pooling else "a generative"
            raise ValueError(f"model: {self.model_config.model} is {kind} model: it does not "
                             + ("generate text" if self.model_config.is_pooling else
                                "pool (embed, classify, score)"))
        feats = None
        features = self.encoder_features(prompt)
        if features is not None:
            if isinstance(prompt, dict) and not ("prompt" in prompt or "prompt_token_ids" in prompt):
                prompt = {"prompt_token_ids": self.audio.decoder_prompt(None, "transcribe")}
            text, ids, types = self.tokenize(prompt)
        elif isinstance(prompt, dict) and ("multi_modal_data" in prompt or "mm_features" in prompt):
            if pooling:
                raise ValueError("multi_modal_data: pooling requests take no images")
            text, ids, feats = self.multimodal(prompt)
            types = None
        else:
            text, ids, types = self.tokenize(prompt)
        if pooling:
            params = self.pooling_params(params)
            if not self.model_config.uses_token_type_ids:
                types = None
            ids, types = self.truncate(ids, types, params)
            self.check_prompt(ids, pooling)
            if types is not None and len(types) != len(ids):
                raise ValueError(f"token_type_ids: {len(types)} given for {len(ids)} tokens")
            return text, ids, [EngineCoreRequest(request_id, ids, None, params, arrival,
                                                 token_type_ids=types)]
        self.check_prompt(ids, pooling)
        sp = self.sampling_params(params, len(ids))
        if features is not None:
            sp = sp.clone(**self.audio.sampling_changes(sp.logit_bias))
        reqs = [EngineCoreRequest(cid, ids, sp.for_sample(i), None, arrival, mm_features=feats or None,
                                  encoder_features=features)
                for i, cid in enumerate(child_ids(request_id, sp.n))]
        return text, ids, reqs

    def encoder_features(self, prompt: PromptType) -> Optional[Tensor]:
        """An encoder-decoder prompt's audio as log-mel features (None for other models);
        ValueError naming the field when the audio is missing, misplaced or too long."""
        mm = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        given = prompt.get("encoder_features") if isinstance(prompt, dict) else None
        if self.audio is None:
            if given is not None:
                raise ValueError(f"encoder_features: {self.model_config.model} takes no audio")
            if isinstance(mm, dict) and "audio" in mm:
                raise ValueError(f"multi_modal_data: {self.model_config.model} takes no audio")
            return None  # images, if any, are the MultiModalProcessor's
        if given is None:
            audio = mm.get("audio") if isinstance(mm, dict) else None
            if audio is None:
                raise ValueError(f"multi_modal_data: {self.model_config.model} transcribes audio; "
                                 "give {\"audio\": (waveform, sample_rate)} (or use "
                                 "/v1/audio/transcriptions)")
            import numpy as np
            from pagoda.inputs.audio import SAMPLE_RATE, resample
            wave, sr = audio if isinstance(audio, tuple) else (audio, SAMPLE_RATE)
            wave = np.asarray(wave, dtype=np.float32)
            if wave.ndim != 1:
                raise ValueError("multi_modal_data: audio must be one channel (a 1-D waveform)")
            given = self.audio.features(resample(wave, int(sr)) if sr != SAMPLE_RATE else wave)
        return Tensor.of(given)
