"""Audio in the front end: file bytes -> 16 kHz mono waveform -> 30 s windows -> Whisper's
log-mel features and decoder prompt.

Decoding: soundfile (libsndfile: wav, flac, ogg/vorbis, ...) first, PyAV (FFmpeg: mp3, m4a/aac,
webm/opus, ...) for what it cannot read; other rates are resampled to 16 kHz by PyAV's resampler
(FFmpeg's swresample), channels averaged to mono. Audio longer than a window is cut near each
30 s mark at its quietest 100 ms (searched over the window's last 5 s), so words are rarely split;
each window is transcribed as its own request and the texts are joined. Features are
transformers' WhisperFeatureExtractor (the model's preprocessor_config.json), so they are the
reference's exactly.

What a Whisper checkpoint's generation_config.json says is applied as transformers' `generate`
applies it: the decoder prompt <|startoftranscript|> <|lang|> <|task|> <|notimestamps|> (after
<|startofprev|> + the prompt's tokens when a prompt is given), suppress_tokens never sampled,
begin_suppress_tokens never first.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

SAMPLE_RATE = 16000
WINDOW_S = 30.0
_SEARCH_S = 5.0      # a long input's cut is placed at the quietest point of its window's last 5 s
_FRAME_S = 0.1       # energy is measured over 100 ms frames


class AudioError(ValueError):
    """Audio that cannot be used; the message starts with the field (`file: ...`)."""


def decode_audio(data: bytes, filename: Optional[str] = None) -> np.ndarray:
    """File bytes -> float32 mono waveform at 16 kHz. AudioError when no decoder reads them."""
    if not data:
        raise AudioError("file: the uploaded file is empty")
    try:
        import soundfile as sf
        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        x = x.mean(axis=1)
    except Exception:  # not a format libsndfile reads: FFmpeg's turn
        x, sr = _decode_av(data, filename)
    if not len(x):
        raise AudioError("file: the audio has no samples")
    if sr != SAMPLE_RATE:
        x = resample(x, sr)
    return np.ascontiguousarray(x, dtype=np.float32)


def _decode_av(data: bytes, filename: Optional[str]) -> tuple[np.ndarray, int]:
    import av
    try:
        with av.open(io.BytesIO(data), "r") as container:
            if not container.streams.audio:
                raise AudioError(f"file: {_name(filename)}has no audio stream")
            stream = container.streams.audio[0]
            sr = stream.rate or stream.codec_context.sample_rate
            # one resampler to planar float mono at the source rate; the rate change comes later
            res = av.AudioResampler(format="fltp", layout="mono", rate=sr)
            parts = [f.to_ndarray().reshape(-1) for frame in container.decode(stream)
                     for f in res.resample(frame)]
            parts += [f.to_ndarray().reshape(-1) for f in res.resample(None)]
    except AudioError:
        raise
    except Exception as e:  # av.error.InvalidDataError and friends
        raise AudioError(f"file: {_name(filename)}could not be decoded as audio (supported: wav, "
                         f"flac, ogg, mp3, m4a, webm and other formats FFmpeg reads): "
                         f"{type(e).__name__}") from None
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), int(sr)


def _name(filename: Optional[str]) -> str:
    return f"{os.path.basename(filename)!r} " if filename else ""


def resample(x: np.ndarray, sr: int, to: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 at `sr` -> at `to`, through FFmpeg's resampler."""
    import av
    res = av.AudioResampler(format="flt", layout="mono", rate=to)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x, np.float32).reshape(1, -1),
                                       format="flt", layout="mono")
    frame.sample_rate = sr
    out = [f.to_ndarray().reshape(-1) for f in res.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in res.resample(None)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def split_audio(x: np.ndarray, sr: int = SAMPLE_RATE, window_s: float = WINDOW_S) -> list[tuple[int, int]]:
    """[start, end) sample ranges of windows no longer than window_s covering x, each cut at the
    quietest 100 ms frame in its last _SEARCH_S seconds."""
    win, frame = int(window_s * sr), int(_FRAME_S * sr)
    bounds, start = [], 0
    while len(x) - start > win:
        lo = start + win - int(_SEARCH_S * sr)
        seg = x[lo:start + win]
        n = len(seg) // frame
        energy = (seg[:n * frame].reshape(n, frame) ** 2).mean(axis=1)
        cut = lo + int(np.argmin(energy)) * frame + frame // 2
        bounds.append((start, cut))
        start = cut
    bounds.append((start, len(x)))
    return bounds


@dataclass
class WhisperPrompt:
    """The special token ids a Whisper decoder prompt is made of."""
    sot: int
    no_timestamps: Optional[int]
    start_of_prev: Optional[int]
    lang_to_id: dict[str, int]
    task_to_id: dict[str, int]


class AudioProcessor:
    """A Whisper checkpoint's feature extractor and generation rules (front end only)."""

    def __init__(self, feature_extractor: Any, generation_config: dict, tokenizer: Any):
        self.fe = feature_extractor
        g = generation_config
        self.frames = int(self.fe.nb_max_frames)
        self.suppress = [int(t) for t in g.get("suppress_tokens") or []]
        self.begin_suppress = tuple(int(t) for t in g.get("begin_suppress_tokens") or [])
        self.is_multilingual = bool(g.get("is_multilingual", True))

        def tid(tok: str) -> Optional[int]:
            if tokenizer is None:
                return None
            i = tokenizer.convert_tokens_to_ids(tok)
            return None if i is None or i == tokenizer.unk_token_id else int(i)
        sot = g.get("decoder_start_token_id")
        self.tokens = WhisperPrompt(
            sot=int(sot) if sot is not None else tid("<|startoftranscript|>"),
            no_timestamps=g.get("no_timestamps_token_id") or tid("<|notimestamps|>"),
            start_of_prev=tid("<|startofprev|>"),
            lang_to_id={k.strip("<|>"): int(v) for k, v in (g.get("lang_to_id") or {}).items()},
            task_to_id={k: int(v) for k, v in (g.get("task_to_id") or {}).items()})

    @classmethod
    def for_model(cls, model_config: Any, model_dir: str, tokenizer: Any) -> Optional["AudioProcessor"]:
        """The processor of an encoder-decoder (Whisper) model; None for any other model."""
        if not model_config.is_encoder_decoder:
            return None
        from transformers import WhisperFeatureExtractor
        return cls(WhisperFeatureExtractor.from_pretrained(model_dir), model_config.generation_config,
                   tokenizer)

    @property
    def languages(self) -> list[str]:
        return sorted(self.tokens.lang_to_id)

    def features(self, x: np.ndarray) -> np.ndarray:
        """One window (<= 30 s at 16 kHz) -> log-mel features [mel bins, 3000] (zero-padded)."""
        if len(x) > self.fe.n_samples:
            raise AudioError(f"multi_modal_data: {len(x) / SAMPLE_RATE:.1f} s of audio in one prompt; "
                             f"Whisper reads at most {self.fe.n_samples / SAMPLE_RATE:.0f} s (the "
                             "transcription endpoints split longer audio)")
        f = self.fe(x, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
        return np.ascontiguousarray(f, dtype=np.float32)

    def decoder_prompt(self, language: Optional[str], task: str, prompt_ids: Optional[list[int]] = None,
                       ) -> list[int]:
        """<|startofprev|> prompt... <|startoftranscript|> <|lang|> <|task|> <|notimestamps|>."""
        t = self.tokens
        ids: list[int] = []
        if prompt_ids:
            if t.start_of_prev is None:
                raise AudioError("prompt: this model's tokenizer has no <|startofprev|> token")
            ids += [t.start_of_prev] + list(prompt_ids)
        ids.append(t.sot)
        if self.is_multilingual and t.lang_to_id:
            language = (language or "en").lower()
            if language not in t.lang_to_id:
                raise AudioError(f"language: {language!r} is not one of this model's languages "
                                 f"({', '.join(self.languages)})")
            ids.append(t.lang_to_id[language])
            if task not in t.task_to_id:
                raise AudioError(f"task: this model does not know the task {task!r}")
            ids.append(t.task_to_id[task])
        elif task == "translate":
            raise AudioError("model: this Whisper model is English-only; it does not translate")
        if t.no_timestamps is not None:
            ids.append(int(t.no_timestamps))
        return ids

    def sampling_changes(self, logit_bias: Optional[dict[int, float]]) -> dict:
        """SamplingParams fields for generation_config's suppression rules."""
        bias = dict(logit_bias or {})
        for t in self.suppress:
            bias[t] = float("-inf")
        return {"logit_bias": bias or None, "begin_suppress_token_ids": self.begin_suppress}
