"""/v1/audio/transcriptions and /v1/audio/translations on a real `pagoda serve` of the tiny
Whisper, through the official openai SDK and raw multipart HTTP: every response format, a 45 s
mp3 split into two windows, streaming, several uploads at once, and OpenAI-shaped errors
(bad / oversized / missing file, unknown format, language, model; a text model on these routes)
after which the server keeps serving. Texts are checked against transformers' generate on the
same weights and the same decoded audio."""
from __future__ import annotations

import concurrent.futures
import io
import re

import httpx
import numpy as np
import pytest
import torch

from server_utils import PagodaServer
from tiny_whisper import build_whisper, synth_audio, write_audio

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> str:
    return build_whisper(str(tmp_path_factory.mktemp("tiny-whisper-srv")))


@pytest.fixture(scope="module")
def server(whisper_dir):
    with PagodaServer(["--model", whisper_dir, "--served-model-name", "whisper-tiny",
                       "--max-audio-file-size", "2MiB"]) as s:
        yield s


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("audio")
    out = {"short.wav": synth_audio(8.0, seed=1), "other.flac": synth_audio(20.0, seed=2),
           "long.mp3": synth_audio(45.0, seed=3, gaps=(26.0,))}
    return {name: open(write_audio(str(d / name), x), "rb").read() for name, x in out.items()}


@pytest.fixture(scope="module")
def reference(whisper_dir):
    """The text transformers' generate gives for each window of a file, as pagoda decodes it."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration
    from pagoda.inputs.audio import decode_audio, split_audio
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir, dtype=torch.float32).eval()
    fe = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    tok = AutoTokenizer.from_pretrained(whisper_dir)

    def windows(data: bytes, task: str = "transcribe", language: str = "en") -> list[str]:
        x = decode_audio(data)
        texts = []
        for a, b in split_audio(x):
            feats = fe(x[a:b], sampling_rate=16000, return_tensors="pt").input_features
            with torch.no_grad():
                ids = model.generate(feats, language=language, task=task, max_new_tokens=124)[0]
            texts.append(tok.decode(ids, skip_special_tokens=True))
        return texts
    return windows


def _text(windows: list[str]) -> str:
    return "".join(windows).strip()


def test_sdk_json_and_text(server, files, reference):
    client = server.openai_client()
    want = reference(files["short.wav"])
    assert len(want) == 1 and _text(want)
    r = client.audio.transcriptions.create(file=("short.wav", files["short.wav"]), model="whisper-tiny")
    assert r.text == _text(want)
    t = client.audio.transcriptions.create(file=("short.wav", files["short.wav"]), model="whisper-tiny",
                                           response_format="text")
    assert t.strip() == _text(want)


def test_long_mp3_verbose_json_srt_vtt(server, files, reference):
    client = server.openai_client()
    want = reference(files["long.mp3"])
    assert len(want) == 2
    v = client.audio.transcriptions.create(file=("long.mp3", files["long.mp3"]), model="whisper-tiny",
                                           response_format="verbose_json",
                                           timestamp_granularities=["segment"])
    assert v.text == _text(want) and v.language == "english" and abs(v.duration - 45.0) < 0.2
    segs = v.segments
    assert [s.text for s in segs] == want
    assert segs[0].start == 0.0 and 26.0 <= segs[0].end <= 26.4 and segs[1].start == segs[0].end
    assert abs(segs[1].end - v.duration) < 1e-3 and all(s.avg_logprob < 0 for s in segs)
    srt = client.audio.transcriptions.create(file=("long.mp3", files["long.mp3"]), model="whisper-tiny",
                                             response_format="srt")
    cues = re.findall(r"(\d+)\n(\d\d:\d\d:\d\d,\d\d\d) --> (\d\d:\d\d:\d\d,\d\d\d)\n(.*)\n", srt)
    assert [c[0] for c in cues] == ["1", "2"] and cues[0][1] == "00:00:00,000"
    assert [c[3] for c in cues] == [w.strip() for w in want]
    vtt = client.audio.transcriptions.create(file=("long.mp3", files["long.mp3"]), model="whisper-tiny",
                                             response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n") and vtt.count(" --> ") == 2 and "00:00:00.000 --> 00:00:2" in vtt


def test_translation_and_language(server, files, reference):
    client = server.openai_client()
    r = client.audio.translations.create(file=("other.flac", files["other.flac"]), model="whisper-tiny")
    assert r.text == _text(reference(files["other.flac"], task="translate"))
    de = client.audio.transcriptions.create(file=("other.flac", files["other.flac"]), model="whisper-tiny",
                                            language="de")
    assert de.text == _text(reference(files["other.flac"], language="de"))


def test_stream(server, files, reference):
    client = server.openai_client()
    events = list(client.audio.transcriptions.create(file=("long.mp3", files["long.mp3"]),
                                                     model="whisper-tiny", stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(deltas) > 2 and len(done) == 1 and events[-1] is done[0]
    assert done[0].text == _text(reference(files["long.mp3"]))
    # the deltas are the incremental detokenizer's: it holds back an unfinished UTF-8 sequence
    # (random weights make plenty), so a window's last characters may differ from the final text
    joined = "".join(deltas)
    assert len(joined) > 10 and done[0].text.startswith(joined[:10])


def test_concurrent_uploads_batch(server, files, reference):
    want = {name: _text(reference(data)) for name, data in files.items()}
    client = server.openai_client()

    def one(name):
        return name, client.audio.transcriptions.create(file=(name, files[name]), model="whisper-tiny").text
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(one, list(files) * 2))
    assert all(text == want[name] for name, text in got)


def _post(server, files=None, data=None, path="/v1/audio/transcriptions", **kw):
    return httpx.post(server.url + path, files=files, data=data, timeout=60, **kw)


def _err(r, status: int, param):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] and err["message"], err
    return err["message"]


def test_bad_input_is_openai_shaped(server, files):
    wav = {"file": ("a.wav", files["short.wav"], "audio/wav")}
    assert "could not be decoded" in _err(_post(server, {"file": ("x.mp3", b"\x00\x01not audio" * 500)},
                                                {"model": "whisper-tiny"}), 400, "file")
    assert "empty" in _err(_post(server, {"file": ("e.wav", b"")}), 400, "file")
    assert "required" in _err(_post(server, data={"model": "whisper-tiny", "x": "1"},
                                    files={"other": ("a", b"1")}), 400, "file")
    _err(_post(server, data={"file": "just text"}, files={"x": ("a", b"1")}), 400, "file")
    _err(httpx.post(server.url + "/v1/audio/transcriptions", json={"file": "a"}), 400, "file")
    assert "response_format" in _err(_post(server, wav, {"response_format": "xml"}), 400, "response_format")
    assert "'xx'" in _err(_post(server, wav, {"language": "xx"}), 400, "language")
    _err(_post(server, wav, {"temperature": "hot"}), 400, "temperature")
    _err(_post(server, wav, {"temperature": "3"}), 400, "temperature")
    _err(_post(server, wav, {"timestamp_granularities[]": "word", "response_format": "verbose_json"}),
         400, "timestamp_granularities")
    _err(_post(server, wav, {"stream": "true", "response_format": "srt"}), 400, "stream")
    _err(_post(server, wav, {"model": "nope"}), 404, "model")
    big = io.BytesIO()
    import soundfile as sf
    sf.write(big, np.zeros(16000 * 80, np.float32), 16000, format="WAV")  # 80 s of PCM16: 2.5 MB
    assert "--max-audio-file-size" in _err(_post(server, {"file": ("big.wav", big.getvalue())}), 413, "file")
    huge = b"RIFF" + bytes(5 << 20)  # past the file limit + the form's allowance: the body is refused
    assert "--max-audio-file-size" in _err(_post(server, {"file": ("huge.wav", huge)}), 413, "file")
    # a speech model does not complete text
    r = httpx.post(server.url + "/v1/completions", json={"model": "whisper-tiny", "prompt": "hi"})
    assert "speech model" in _err(r, 400, "model")
    # and it kept serving
    ok = _post(server, wav, {"model": "whisper-tiny"})
    assert ok.status_code == 200 and ok.json()["text"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_text_model_refuses_audio(tiny_llama_dir, files):
    with PagodaServer(["--model", tiny_llama_dir, "--max-model-len", "256"]) as s:
        r = _post(s, {"file": ("a.wav", files["short.wav"])}, {"model": tiny_llama_dir})
        assert "not a speech model" in _err(r, 400, "model")
        r = _post(s, {"file": ("a.wav", files["short.wav"])}, path="/v1/audio/translations")
        _err(r, 400, "model")
        done = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
        assert done.status_code == 200
