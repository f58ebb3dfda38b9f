"""Whisper (HF ``WhisperForConditionalGeneration``): speech recognition and translation as an
encoder-decoder.

The encoder reads one 30 s window of log-mel features (two convolutions, then pre-LN
transformer layers over its 1500 frames) once per request; every decoder layer projects that
output to its cross-attention K/V at once, and the model runner keeps them for the request's
life (`pagoda.worker.cross_attention`). The decoder is a causal text model on the paged KV
cache like any other: learned positions, per layer self-attention -> cross-attention over the
request's audio -> MLP (all pre-LayerNorm), a final LayerNorm, and logits from the token
embedding (tied) or ``proj_out``.

Module and parameter names are HF's (``model.encoder.layers.N.self_attn.q_proj``, ...), so the
checkpoint loads name for name; decoder q/k/v stay three projections (k has no bias, as in HF).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.layers.attention import Attention, CrossAttention
from pagoda.models.weights import expected_names, load_named

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu,
                "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def _act(config):
    name = getattr(config, "activation_function", "gelu")
    if name not in _ACTIVATIONS:
        raise ValueError(f"--model: Whisper activation_function {name!r} is not supported; "
                         f"supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class _Projections(nn.Module):
    """q/k/v/out of one attention block (HF's names: k_proj has no bias)."""

    def __init__(self, d: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)


class WhisperEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.num_heads = config.encoder_attention_heads
        self.head_dim = d // self.num_heads
        self.self_attn = _Projections(d)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = _act(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        a = self.self_attn
        h = self.self_attn_layer_norm(x)

        def heads(t):
            return t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(heads(a.q_proj(h)), heads(a.k_proj(h)), heads(a.v_proj(h)))
        x = x + a.out_proj(o.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        self.layers = nn.ModuleList(WhisperEncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        self.act = _act(config)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, mel bins, 2 * max_source_positions] -> [B, max_source_positions, d]."""
        x = self.act(self.conv2(self.act(self.conv1(features)))).transpose(1, 2)
        x = x + self.embed_positions.weight[:x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class WhisperDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.num_heads = config.decoder_attention_heads
        self.num_kv_heads = self.num_heads
        self.head_dim = d // self.num_heads
        scale = self.head_dim ** -0.5
        self.self_attn = _Projections(d)
        self.self_attn.attn = Attention(self.num_heads, self.num_heads, self.head_dim, scale)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = _Projections(d)
        self.encoder_attn.attn = CrossAttention(self.num_heads, self.head_dim, scale)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = _act(config)

    def cross_kv(self, enc: torch.Tensor) -> torch.Tensor:
        """This layer's cross-attention K/V of encoder outputs [B, S, d]: [2, B, S, heads, head_dim]."""
        b, s, _ = enc.shape
        a = self.encoder_attn
        return torch.stack((a.k_proj(enc), a.v_proj(enc))).view(2, b, s, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        a = self.self_attn
        h = self.self_attn_layer_norm(x)
        shape = (t, self.num_heads, self.head_dim)
        o = a.attn(a.q_proj(h).view(shape), a.k_proj(h).view(shape), a.v_proj(h).view(shape))
        x = x + a.out_proj(o.reshape(t, -1))
        c = self.encoder_attn
        o = c.attn(c.q_proj(self.encoder_attn_layer_norm(x)).view(shape))
        x = x + c.out_proj(o.reshape(t, -1))
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class WhisperDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        self.embed_positions = nn.Embedding(config.max_target_positions, d)
        self.layers = nn.ModuleList(WhisperDecoderLayer(config) for _ in range(config.decoder_layers))
        self.layer_norm = nn.LayerNorm(d)


class _Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.encoder = WhisperEncoder(config)
        self.decoder = WhisperDecoder(config)


class WhisperForConditionalGeneration(nn.Module):
    """forward(input_ids [T], positions [T]) -> decoder hidden states [T, d] of a flattened
    batch; the requests' cross-attention K/V are bound by the model runner (`encode` makes them)."""
    is_encoder_decoder = True

    def __init__(self, config, max_position: int | None = None):
        super().__init__()
        from pagoda.distributed.parallel_state import tp_size
        if tp_size() > 1:
            raise ValueError("--tensor-parallel-size: Whisper runs on one device")
        self.config = config
        self.model = _Model(config)
        self.tied = bool(getattr(config, "tie_word_embeddings", True))
        self.proj_out = None if self.tied else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.num_encoder_frames = 2 * config.max_source_positions  # one 30 s window of mel frames
        self.num_encoder_positions = config.max_source_positions

    # -- the runner's interface ---------------------------------------------------------------
    def attention_layers(self) -> list:
        return [layer.self_attn.attn for layer in self.model.decoder.layers]

    def cross_attention_layers(self) -> list:
        return [layer.encoder_attn.attn for layer in self.model.decoder.layers]

    def cross_kv_shape(self) -> tuple[int, int, int, int]:
        """(layers, positions, heads, head_dim) of one request's cross-attention K/V."""
        layer = self.model.decoder.layers[0]
        return (len(self.model.decoder.layers), self.num_encoder_positions, layer.num_heads,
                layer.head_dim)

    def encode(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Mel features [B, bins, frames] -> per decoder layer its K/V [2, B, S, heads, head_dim]."""
        enc = self.model.encoder(features)
        return [layer.cross_kv(enc) for layer in self.model.decoder.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        dec = self.model.decoder
        x = dec.embed_tokens(input_ids) + dec.embed_positions(positions)
        for layer in dec.layers:
            x = layer(x)
        return dec.layer_norm(x)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.model.decoder.embed_tokens.weight if self.tied else self.proj_out.weight
        return h @ w.t()

    # -- weights ---------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # names as in the checkpoint, no merged projections; a tied head is the token embedding
        return load_named(self, ((n, t) for n, t in weights if not (n == "proj_out.weight" and self.tied)),
                          packed={})

    def expected_weights(self) -> set[str]:
        return expected_names(self)
