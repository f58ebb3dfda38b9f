"""Where an encoder-decoder model (Whisper) keeps each request's cross-attention K/V.

The encoder runs once per request, in the step that first schedules it; every decoder layer's
K/V of that output go to the request's row here (the row it holds in the `InputBatch`) and stay
until the request finishes, so no later step, and no recompute after a preemption, runs the
encoder again. The store is allocated once, one row per batch slot, before the memory plan: the
KV cache gets what is left.
"""
from __future__ import annotations

import numpy as np
import torch


class CrossAttentionStore:
    def __init__(self, model, rows: int, dtype: torch.dtype, device: torch.device):
        layers, positions, heads, head_dim = model.cross_kv_shape()
        self.model = model
        self.frames = model.num_encoder_frames
        self.kv = torch.zeros(layers, 2, rows, positions, heads, head_dim, dtype=dtype, device=device)
        for layer, kv in zip(model.cross_attention_layers(), self.kv):
            layer.cross_kv = kv

    @staticmethod
    def bytes_per_row(model, dtype: torch.dtype) -> int:
        layers, positions, heads, head_dim = model.cross_kv_shape()
        return 2 * layers * positions * heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def fill(self, rows: list[int], features: list[np.ndarray]) -> None:
        """Run the encoder on these requests' mel features (one batch) and keep their K/V."""
        for f in features:
            if f.ndim != 2 or f.shape[1] != self.frames:
                raise ValueError(f"encoder features of shape {tuple(f.shape)}; this model reads "
                                 f"[mel bins, {self.frames}] (one 30 s window)")
        x = torch.from_numpy(np.stack(features)).to(self.kv.device, self.kv.dtype)
        index = torch.tensor(rows, device=self.kv.device)
        for store, kv in zip(self.kv, self.model.encode(x)):
            store[:, index] = kv
