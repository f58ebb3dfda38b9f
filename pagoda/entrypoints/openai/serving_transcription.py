"""POST /v1/audio/transcriptions and /v1/audio/translations: OpenAI's multipart form
(`file`, `model`, `language`, `prompt`, `response_format` json | text | verbose_json | srt | vtt,
`temperature`, `timestamp_granularities[]`, `stream`) on a Whisper model.

The file is decoded (soundfile, then PyAV), resampled to 16 kHz and cut into 30 s windows at
quiet points, and each window's features computed, all off the event loop
(`pagoda.inputs.audio`); every window is one engine request with the decoder prompt
[<|startofprev|> prompt] <|startoftranscript|> <|lang|> <|task|> <|notimestamps|>, so the windows
of one file (and of everyone's files) decode in one batch; their texts are joined in order.
Segments (verbose_json, srt, vtt) are the windows, timed by where they were cut. `stream`
(json / text) sends OpenAI's `transcript.text.delta` events, then `transcript.text.done`.
Without `language`, English is assumed (as vLLM does).
"""
from __future__ import annotations

import asyncio
import math
import zlib
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response

from pagoda.inputs.audio import SAMPLE_RATE, AudioError, decode_audio, split_audio
from pagoda.sampling_params import SamplingParams

from .errors import OpenAIError
from .serving_base import OpenAIServing, bad_request, random_id
from .streams import SSE_DONE, SSEResponse, json_response, sse, sse_error

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
_FIELDS = ("file", "model", "language", "prompt", "response_format", "temperature",
           "timestamp_granularities[]", "timestamp_granularities", "stream")

# the multipart body, for the OpenAPI document (the form is read by hand: errors name the field)
OPENAPI_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"},
        "model": {"type": "string"},
        "language": {"type": "string", "description": "ISO-639-1 code (default en)"},
        "prompt": {"type": "string"},
        "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS)},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "timestamp_granularities[]": {"type": "array", "items": {"type": "string", "enum": ["segment"]}},
        "stream": {"type": "boolean"}}}}}}}


class TranscriptionUsage(BaseModel):
    type: str = "duration"
    seconds: int


class TranscriptionResponse(BaseModel):
    text: str
    usage: Optional[TranscriptionUsage] = None


class TranscriptionSegment(BaseModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float


class TranscriptionVerboseResponse(BaseModel):
    task: str
    language: str
    duration: float
    text: str
    segments: list[TranscriptionSegment]
    usage: Optional[TranscriptionUsage] = None


@dataclass
class _Form:
    data: bytes
    filename: Optional[str]
    model: Optional[str]
    language: Optional[str]
    prompt: Optional[str]
    response_format: str
    temperature: float
    stream: bool


@dataclass
class _Window:
    start: float
    end: float
    features: object  # np.ndarray [mel bins, 3000]


def _language_name(code: str) -> str:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES
    return LANGUAGES.get(code, code)


def _timestamp(t: float, sep: str) -> str:
    ms = int(round(t * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def subtitles(segments: list[TranscriptionSegment], fmt: str) -> str:
    """SubRip (srt) or WebVTT (vtt) text of the segments."""
    sep = "," if fmt == "srt" else "."
    cues = []
    for i, seg in enumerate(segments):
        times = f"{_timestamp(seg.start, sep)} --> {_timestamp(seg.end, sep)}"
        cues.append(f"{i + 1}\n{times}\n{seg.text.strip()}\n" if fmt == "srt"
                    else f"{times}\n{seg.text.strip()}\n")
    return ("\n".join(cues) + "\n") if fmt == "srt" else "WEBVTT\n\n" + "\n".join(cues)


class ServingTranscription:
    def __init__(self, serving: OpenAIServing, max_bytes: int = 25 << 20):
        self.s = serving
        self.max_bytes = max_bytes  # --max-audio-file-size
        self.audio = serving.engine.processor.audio  # None: not a Whisper model

    # -- the form ---------------------------------------------------------------------------
    async def _form(self, raw: Request, translate: bool) -> _Form:
        if not raw.headers.get("content-type", "").startswith("multipart/form-data"):
            raise OpenAIError("The request body must be multipart/form-data with the audio in `file` "
                              "(as OpenAI's audio endpoints take it).", param="file")
        try:
            form = await raw.form(max_files=1, max_fields=len(_FIELDS) + 8)
        except Exception as e:  # malformed multipart, too many parts
            raise OpenAIError(f"The multipart body could not be read: {getattr(e, 'detail', e)}",
                              param="file") from None
        try:
            up = form.get("file")
            if up is None:
                raise OpenAIError("file: required (the audio file to transcribe)", param="file")
            if not isinstance(up, UploadFile):
                raise OpenAIError("file: must be a file upload, not a text field", param="file")
            data = await up.read()
            if len(data) > self.max_bytes:
                raise OpenAIError(f"The audio file is too large ({len(data)} bytes): the limit is "
                                  f"{self.max_bytes} bytes (--max-audio-file-size).", 413, param="file",
                                  code="request_too_large")

            def text(name: str) -> Optional[str]:
                v = form.get(name)
                if v is not None and not isinstance(v, str):
                    raise OpenAIError(f"{name}: must be a text field", param=name)
                return v if v != "" else None
            fmt = text("response_format") or "json"
            if fmt not in RESPONSE_FORMATS:
                raise OpenAIError(f"response_format: {fmt!r} is not one of {', '.join(RESPONSE_FORMATS)}",
                                  param="response_format")
            temp_s = text("temperature")
            try:
                temperature = float(temp_s) if temp_s is not None else 0.0
            except ValueError:
                raise OpenAIError(f"temperature: {temp_s!r} is not a number", param="temperature") from None
            if not (0.0 <= temperature <= 1.0) or math.isnan(temperature):
                raise OpenAIError(f"temperature: must be in [0, 1], got {temp_s}", param="temperature")
            stream_s = (text("stream") or "false").lower()
            if stream_s not in ("true", "false", "1", "0"):
                raise OpenAIError(f"stream: {stream_s!r} is not a boolean", param="stream")
            stream = stream_s in ("true", "1")
            if stream and fmt not in ("json", "text"):
                raise OpenAIError(f"stream: streaming returns text; response_format {fmt!r} cannot be "
                                  "streamed (use json or text)", param="stream")
            grans = [g for name in ("timestamp_granularities[]", "timestamp_granularities")
                     for g in form.getlist(name)]
            for g in grans:
                if g not in ("segment", "word"):
                    raise OpenAIError(f"timestamp_granularities: {g!r} is not segment or word",
                                      param="timestamp_granularities")
                if g == "word":
                    raise OpenAIError("timestamp_granularities: word timestamps are not supported; "
                                      "segment timestamps are (response_format verbose_json)",
                                      param="timestamp_granularities")
            if grans and fmt != "verbose_json":
                raise OpenAIError("timestamp_granularities: needs response_format verbose_json",
                                  param="timestamp_granularities")
            return _Form(data, up.filename, text("model"), text("language"), text("prompt"), fmt,
                         temperature, stream)
        finally:
            await form.close()

    def _check_model(self, model: Optional[str], route: str) -> None:
        s = self.s
        s.check_model(model)
        if self.audio is None:
            raise OpenAIError(f"The model `{s.model_name}` is not a speech model: it does not serve "
                              f"{route}. Start `pagoda serve` with a Whisper checkpoint "
                              "(WhisperForConditionalGeneration).", param="model", code="unsupported")

    # -- audio, off the event loop --------------------------------------------------------------
    def _windows(self, data: bytes, filename: Optional[str]) -> tuple[float, list[_Window]]:
        x = decode_audio(data, filename)
        windows = [_Window(a / SAMPLE_RATE, b / SAMPLE_RATE, self.audio.features(x[a:b]))
                   for a, b in split_audio(x)]
        return len(x) / SAMPLE_RATE, windows

    # -- the endpoint ---------------------------------------------------------------------------
    async def create(self, raw: Request, translate: bool) -> Response:
        route = "/v1/audio/translations" if translate else "/v1/audio/transcriptions"
        s = self.s
        form = await self._form(raw, translate)
        self._check_model(form.model, route)
        task = "translate" if translate else "transcribe"
        try:
            prompt_ids = (await s.encode(" " + form.prompt.strip(), add_special_tokens=False)
                          if form.prompt else None)
            if prompt_ids:  # as Whisper: the prompt's last tokens, at most half the context
                prompt_ids = prompt_ids[-(s.max_model_len // 2 - 1):]
            decoder_prompt = self.audio.decoder_prompt(form.language, task, prompt_ids)
            s.check_engine()
            duration, windows = await asyncio.get_running_loop().run_in_executor(
                None, self._windows, form.data, form.filename)
        except AudioError as e:
            raise bad_request(e) from e
        # verbose_json's avg_logprob needs each token's own logprob (logprobs=0)
        params = SamplingParams(temperature=form.temperature,
                                logprobs=0 if form.response_format == "verbose_json" else None,
                                max_tokens=max(s.max_model_len - len(decoder_prompt), 1))
        request_id = random_id("trsc" if not translate else "trsl")
        ids = [request_id] if len(windows) == 1 else [f"{request_id}-{i}" for i in range(len(windows))]
        started = await s.start_all(raw, [{"prompt_token_ids": decoder_prompt, "encoder_features": w.features}
                                          for w in windows], [params] * len(windows), ids)
        streams = [s.follow(first, gen, rid) for (first, gen), rid in zip(started, ids)]
        usage = TranscriptionUsage(seconds=int(math.ceil(duration)))
        if form.stream:
            return SSEResponse(self._stream(streams, request_id, usage))
        outs = await s.collect(raw, streams)
        texts = [await self._decode(o.outputs[0].token_ids) for o in outs]
        text = "".join(texts).strip()
        if form.response_format == "text":
            return Response(text + "\n", media_type="text/plain")
        if form.response_format == "json":
            return json_response(TranscriptionResponse(text=text, usage=usage))
        segments = []
        for i, (w, o) in enumerate(zip(windows, outs)):
            c = o.outputs[0]
            raw_text = texts[i].encode("utf-8")
            segments.append(TranscriptionSegment(
                id=i, seek=int(round(w.start * 100)), start=round(w.start, 3), end=round(w.end, 3),
                text=texts[i], tokens=list(c.token_ids), temperature=form.temperature,
                avg_logprob=(c.cumulative_logprob or 0.0) / max(len(c.token_ids), 1),
                compression_ratio=len(raw_text) / max(len(zlib.compress(raw_text)), 1)))
        if form.response_format in ("srt", "vtt"):
            return Response(subtitles(segments, form.response_format),
                            media_type="text/plain" if form.response_format == "srt" else "text/vtt")
        return json_response(TranscriptionVerboseResponse(
            task=task, language=_language_name((form.language or "en").lower()),
            duration=round(duration, 3), text=text, segments=segments, usage=usage))

    async def _decode(self, token_ids: list[int]) -> str:
        """A window's whole text from its tokens (the incremental detokenizer holds back an
        unfinished UTF-8 sequence at the end; the final text is the tokenizer's own decode)."""
        # off_loop calls fn(tokenizer, ...) with the tokenizer thread's own copy
        return await self.s.off_loop(lambda tok, ids: tok.decode(ids, skip_special_tokens=True),
                                     token_ids)

    async def _stream(self, streams: list[AsyncIterator], request_id: str,
                      usage: TranscriptionUsage) -> AsyncIterator[str]:
        """The windows' text deltas in order (later windows decode meanwhile; theirs wait)."""
        started = False
        texts: list[str] = []
        try:
            for stream in streams:
                out = None
                async for out in stream:
                    delta = "".join(out.delta_text.values())
                    if not started:
                        delta = delta.lstrip()  # as the joined text: no leading space
                    if delta:
                        started = True
                        yield sse({"type": "transcript.text.delta", "delta": delta})
                texts.append(await self._decode(out.outputs[0].token_ids) if out is not None else "")
            yield sse({"type": "transcript.text.done", "text": "".join(texts).strip(),
                       "usage": usage.model_dump()})
            yield SSE_DONE
        except Exception as e:  # noqa: BLE001 - the status line is sent: the error is an event
            yield sse_error(e, request_id)
        finally:
            for stream in streams:
                await stream.aclose()

