"""Whisper on the engine against transformers' own model and `generate` on the same tiny
random-weight checkpoint and synthetic audio: greedy tokens equal token for token, for several
requests batched together, with a text prompt, under preemption, and for audio longer than 30 s
(split at a quiet point into windows, each checked against `generate` on its window); audio
decoding of wav / flac / ogg / mp3 / m4a and resampling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny_whisper import build_whisper, synth_audio, write_audio

N_TOKENS = 24


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> str:
    return build_whisper(str(tmp_path_factory.mktemp("tiny-whisper")))


@pytest.fixture(scope="module")
def reference(whisper_dir):
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir, dtype=torch.float32).eval()
    fe = WhisperFeatureExtractor.from_pretrained(whisper_dir)

    def generate(x: np.ndarray, max_new_tokens: int = N_TOKENS, **kw) -> list[int]:
        feats = fe(x, sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            out = model.generate(feats, language="en", task="transcribe",
                                 max_new_tokens=max_new_tokens, **kw)
        return out[0].tolist()
    return generate


@pytest.fixture(scope="module")
def llm(whisper_dir):
    from pagoda import LLM
    return LLM(whisper_dir, num_gpu_blocks_override=64)


def _greedy(n: int = N_TOKENS):
    from pagoda import SamplingParams
    return SamplingParams(temperature=0, max_tokens=n)


def _audio(seconds: float, seed: int, **kw):
    return {"multi_modal_data": {"audio": (synth_audio(seconds, seed=seed, **kw), 16000)}}


def test_greedy_tokens_equal_transformers_batched(llm, reference):
    """Four audio requests run in one batch (their decodes share steps); each one's tokens are
    what transformers' generate gives for it alone."""
    clips = [synth_audio(s, seed=i) for i, s in enumerate((3.0, 7.5, 12.0, 29.0))]
    outs = llm.generate([{"multi_modal_data": {"audio": (x, 16000)}} for x in clips], _greedy(),
                        use_tqdm=False)
    want = [reference(x) for x in clips]
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert len({tuple(w) for w in want}) == len(want), "the clips should decode differently"
    # the engine stops at EOS, as generate does; generate pads finished rows, alone it has none
    assert got == want


def test_prompt_and_prefix_tokens(llm, reference, whisper_dir):
    """OpenAI's `prompt`: <|startofprev|> + its tokens before the task prefix, as generate's
    prompt_ids."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(whisper_dir)
    x = synth_audio(6.0, seed=11)
    prompt_ids = tok(" the rest", add_special_tokens=False).input_ids
    want = reference(x, prompt_ids=torch.tensor(tok.get_prompt_ids(" the rest")))
    proc = llm.llm_engine.processor.audio
    prompt = proc.decoder_prompt("en", "transcribe", prompt_ids)
    out = llm.generate({"prompt_token_ids": prompt, "multi_modal_data": {"audio": (x, 16000)}}, _greedy(),
                       use_tqdm=False)[0]
    got = list(out.outputs[0].token_ids)
    assert prompt[:len(prompt_ids) + 1] == tok.get_prompt_ids(" the rest").tolist()
    assert got == want and got != reference(x)  # the prompt changed the text


def test_preempted_requests_keep_their_audio(whisper_dir, reference):
    """A KV cache too small for every request at once: requests are preempted and recomputed
    from their kept cross-attention K/V; tokens are unchanged."""
    from pagoda import LLM
    llm = LLM(whisper_dir, num_gpu_blocks_override=6, block_size=16, max_model_len=64)
    clips = [synth_audio(4.0 + i, seed=20 + i) for i in range(4)]
    outs = llm.generate([{"multi_modal_data": {"audio": (x, 16000)}} for x in clips], _greedy(40),
                        use_tqdm=False)
    assert llm.llm_engine.core.scheduler.num_preemptions > 0
    assert [list(o.outputs[0].token_ids) for o in outs] == [reference(x, 40) for x in clips]


def test_long_audio_split_at_quiet_point(reference, llm):
    """45 s with a quiet stretch at 27 s: two windows cut inside it, each decoded as its own
    request equal to generate on that window."""
    from pagoda.inputs.audio import split_audio
    x = synth_audio(45.0, seed=5, gaps=(27.0,))
    bounds = split_audio(x)
    assert len(bounds) == 2 and 27.0 * 16000 <= bounds[0][1] <= 27.4 * 16000
    assert bounds[0][0] == 0 and bounds[0][1] == bounds[1][0] and bounds[1][1] == len(x)
    chunks = [x[a:b] for a, b in bounds]
    outs = llm.generate([{"multi_modal_data": {"audio": (c, 16000)}} for c in chunks], _greedy(),
                        use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == [reference(c) for c in chunks]


def test_audio_longer_than_a_window_in_one_prompt_is_refused(llm):
    with pytest.raises(ValueError, match="multi_modal_data: 31.0 s"):
        llm.generate(_audio(31.0, 0), _greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate("no audio", _greedy(), use_tqdm=False)


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3", "m4a"])
def test_decode_formats(tmp_path, ext):
    from pagoda.inputs.audio import decode_audio
    x = synth_audio(2.0, seed=3)
    path = write_audio(str(tmp_path / f"a.{ext}"), x)
    y = decode_audio(open(path, "rb").read(), path)
    assert y.dtype == np.float32 and abs(len(y) - len(x)) < 0.15 * 16000  # codecs pad (AAC: ~0.1 s)
    n = min(len(x), len(y))
    if ext in ("wav", "flac"):  # lossless
        assert np.abs(y[:n] - x[:n]).max() < 1e-3
    else:  # lossy: the waveform correlates, once aligned (encoders delay it a little)
        best = max(np.corrcoef(x[:n - 2000], y[d:d + n - 2000])[0, 1] for d in range(0, 1600, 8))
        assert best > 0.9


def test_resample_and_bad_bytes(tmp_path):
    from pagoda.inputs.audio import AudioError, decode_audio
    import soundfile as sf
    x = synth_audio(2.0, sr=44100, seed=4)
    sf.write(str(tmp_path / "b.wav"), np.stack([x, x], axis=1), 44100)  # stereo 44.1 kHz
    y = decode_audio(open(tmp_path / "b.wav", "rb").read())
    assert abs(len(y) - 32000) < 200
    with pytest.raises(AudioError, match="^file: 'x.txt' could not be decoded"):
        decode_audio(b"this is not audio at all" * 100, "x.txt")
    with pytest.raises(AudioError, match="^file: the uploaded file is empty"):
        decode_audio(b"")
