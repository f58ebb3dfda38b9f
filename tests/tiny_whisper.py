"""A tiny random-weight Whisper checkpoint (HF format) built offline: WhisperConfig with the real
audio front (80 mel bins, 1500 encoder positions = 30 s) and a small model behind it, the
WhisperFeatureExtractor, a byte-level BPE WhisperTokenizer made here (256 byte tokens, a few
merges, then Whisper's special tokens in Whisper's order: <|endoftext|>, <|startoftranscript|>,
languages, tasks, <|notimestamps|>, timestamps), and a generation_config.json carrying what real
checkpoints carry (lang_to_id, task_to_id, suppress_tokens, begin_suppress_tokens).

Also: synthetic audio (a sine sweep with noise) written as wav / flac / mp3."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

LANGUAGES = ["en", "de", "fr", "es"]
_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
           ("Ġ", "s"), ("r", "e"), ("a", "t"), ("e", "n"), ("Ġ", "w")]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def special_tokens() -> list[str]:
    return (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{lang}|>" for lang in LANGUAGES]
            + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
               "<|notimestamps|>"] + [f"<|{i * 0.02:.2f}|>" for i in range(1501)])


def build_tokenizer(path: str):
    from transformers import WhisperTokenizer
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    for a, b in _MERGES:
        vocab.setdefault(a + b, len(vocab))
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))
    specials = special_tokens()
    tok = WhisperTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"),
                           unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                           eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tok


def build_whisper(path: str, seed: int = 0, **overrides) -> str:
    """The checkpoint directory (safetensors, config, preprocessor, tokenizer, generation config)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
    os.makedirs(path, exist_ok=True)
    tok = build_tokenizer(path)
    ids = {t: tok.convert_tokens_to_ids(t) for t in special_tokens()[:len(LANGUAGES) + 8]}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    cfg = dict(vocab_size=len(tok), num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
               decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=128,
               pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot,
               begin_suppress_tokens=None, suppress_tokens=None)
    cfg.update(overrides)
    config = WhisperConfig(**cfg)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    # wide weights, so greedy choices are not near-ties; sharp cross-attention, so the text
    # depends on the audio (near-uniform attention over 1500 frames averages it away)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "encoder_attn." in name and name.endswith("weight") and "layer_norm" not in name:
                p.normal_(0, 0.45 if ("q_proj" in name or "k_proj" in name) else 0.225)
            elif "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "embed_positions" not in name or "decoder" in name:
                p.normal_(0, 0.15)
    g = model.generation_config
    g.decoder_start_token_id = sot
    g.eos_token_id = g.pad_token_id = eot
    g.lang_to_id = {f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in LANGUAGES}
    g.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    g.no_timestamps_token_id = ids["<|notimestamps|>"]
    g.is_multilingual = True
    g.max_length = config.max_target_positions
    g._from_model_config = False  # else from_pretrained rebuilds it from config.json
    # as real checkpoints: a few text tokens never produced, and no EOS / space as the first token.
    # Timestamps too: a trained Whisper emits none after <|notimestamps|>; random weights would,
    # and transformers' generate then reads its output as several segments and decodes on
    g.suppress_tokens = [1, 2, 3, 60, 61] + list(range(ids["<|notimestamps|>"] + 1, len(tok)))
    g.begin_suppress_tokens = [vocab_space(tok), eot]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path


def vocab_space(tok) -> int:
    return tok.convert_tokens_to_ids("Ġ")


def synth_audio(seconds: float, sr: int = 16000, seed: int = 0, gaps: tuple[float, ...] = ()) -> np.ndarray:
    """A sine sweep (its range drawn from `seed`, within 100 Hz - 4 kHz) with noise, float32 in
    [-1, 1]; `gaps`: times (s) where 0.4 s of near-silence sits (where long audio can be split)."""
    rng = np.random.default_rng(seed)
    lo, hi = rng.uniform(100, 800), rng.uniform(1000, 4000)
    t = np.arange(int(seconds * sr)) / sr
    f = lo + (hi - lo) * t / max(seconds, 1e-6)
    x = rng.uniform(0.2, 0.6) * np.sin(2 * np.pi * np.cumsum(f) / sr) + 0.1 * rng.standard_normal(t.shape)
    for g in gaps:
        a, b = int(g * sr), int((g + 0.4) * sr)
        x[a:b] *= 0.01
    return x.astype(np.float32)


def write_audio(path: str, x: np.ndarray, sr: int = 16000) -> str:
    """wav / flac / ogg through soundfile, mp3 / m4a through PyAV (by the file's extension)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".wav", ".flac", ".ogg"):
        import soundfile as sf
        sf.write(path, x, sr)
        return path
    import av
    codec = {".mp3": "mp3", ".m4a": "aac"}[ext]
    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=sr, layout="mono")
        frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = sr
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path
