"""The SigLIP vision transformer as Idefics3 and SmolVLM run it: patch convolution (with bias),
position embeddings looked up by each patch's fractional place in its image (so tiles of any
size share one table), CLIP's pre-norm encoder block, a final LayerNorm; no CLS token. One
sequence per image tile."""
from __future__ import annotations

import torch
from torch import nn

from pagoda.layers.attention import EncoderMetadata
from pagoda.layers.norm import LayerNorm
from pagoda.models.clip import PatchConv, VisionEncoder


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.patch = config.patch_size
        self.per_side = config.image_size // config.patch_size
        self.patch_embedding = PatchConv(config.num_channels, config.hidden_size, self.patch, bias=True)
        self.position_embedding = nn.Embedding(self.per_side ** 2, config.hidden_size)
        self.position_embedding.weight.requires_grad_(False)

    def position_ids(self, rows: int, cols: int, device) -> torch.Tensor:
        """Table rows of a rows x cols patch grid: each patch's fractional coordinates
        bucketed onto the per_side x per_side grid the table was trained on (float32, as
        transformers computes them)."""
        n = self.per_side
        bounds = torch.arange(1 / n, 1.0, 1 / n, device=device)
        fh = torch.clamp(torch.arange(rows, device=device, dtype=torch.float32) * (1.0 / rows), max=1 - 1e-6)
        fw = torch.clamp(torch.arange(cols, device=device, dtype=torch.float32) * (1.0 / cols), max=1 - 1e-6)
        bh = torch.bucketize(fh, bounds, right=True)
        bw = torch.bucketize(fw, bounds, right=True)
        return (bh[:, None] * n + bw[None, :]).reshape(-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] tiles (all of them whole) -> [B, patches, hidden]"""
        x = self.patch_embedding(pixels)
        rows, cols = pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch
        return x + self.position_embedding(self.position_ids(rows, cols, pixels.device))


class SiglipVisionModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = VisionEncoder(config, config.num_hidden_layers)
        self.post_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, patches, hidden] (last layer, after the final norm)"""
        x = self.embeddings(pixels)
        B, L, H = x.shape
        meta = EncoderMetadata.of([i * L for i in range(B + 1)], x.device)
        x = x.reshape(B * L, H)
        for layer in self.encoder.layers:
            x = layer(x, meta)
        return self.post_layernorm(x).view(B, L, H)
