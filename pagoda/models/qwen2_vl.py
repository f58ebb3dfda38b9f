"""Qwen2-VL and Qwen2.5-VL: a native-resolution ViT and a Qwen2 language model with M-RoPE.

Vision tower: the image processor cuts an image (resized to multiples of 28 between min and
max pixels) into 14x14 patches, ordered so each 2x2 block of neighbours is consecutive; a
linear patch embedding (the checkpoint's Conv3d over 2 copies of the frame), blocks of
attention with 2-D rotary (row, column) within each image, then the merger folds each 2x2 block
into one token of the language model's width. Qwen2.5-VL uses RMSNorm and a gated SiLU MLP,
and attends within 112-pixel windows except in its `fullatt_block_indexes` layers (the
patches are reordered window by window for that, and the merged tokens put back).

Language model: Qwen2's layers; every prompt token has (t, h, w) rotary positions: text tokens
count on as usual (three equal positions), an image's tokens take (start, start + row, start +
column) of its merged grid, and the text after it continues at start + max(rows, columns).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pagoda.layers.activation import Activation
from pagoda.layers.attention import EncoderAttention, EncoderMetadata, to_device_async
from pagoda.layers.linear import Linear
from pagoda.layers.norm import LayerNorm, RMSNorm
from pagoda.layers.rotary import MRotaryEmbedding, VisionRotaryEmbedding, rope_parameters
from pagoda.models.clip import VisionMLP
from pagoda.models.interfaces import SupportsMultiModal, text_config_of
from pagoda.models.qwen2 import Qwen2ForCausalLM


class Qwen2VLTextModel(Qwen2ForCausalLM):
    """Qwen2's layers with M-RoPE (positions [3, T], or [T] when all three are equal)."""

    def rotary_embeddings(self, config, max_position: int):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        params = rope_parameters(config)
        section = list(params.get("mrope_section") or [16, 24, 24])
        rotary = MRotaryEmbedding(head_dim, max_position, params, section)
        return [rotary] * config.num_hidden_layers


# -- vision tower ----------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    def __init__(self, vc, dim: int):
        super().__init__()
        k = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        self.proj = Linear(k, dim)  # the checkpoint's Conv3d (kernel = stride) over flat patches

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(patches.to(self.proj.weight.dtype))


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.proj = Linear(dim, dim, bias=True)
        self.attn = EncoderAttention(heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, x, meta: EncoderMetadata, rotary: VisionRotaryEmbedding, table: torch.Tensor):
        T = x.shape[0]
        q, k, v = self.qkv(x).view(T, 3, self.heads, self.head_dim).unbind(1)
        q, k = rotary(table, q, k)
        return self.proj(self.attn(q, k, v, meta).reshape(T, -1))


class VisionGatedMLP(nn.Module):
    """Qwen2.5-VL: down(act(gate(x)) * up(x)), all with biases."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=True)
        self.up_proj = Linear(dim, hidden, bias=True)
        self.down_proj = Linear(hidden, dim, bias=True)
        self.act = Activation(act)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, vc, dim: int, v25: bool):
        super().__init__()
        norm = (lambda: RMSNorm(dim, 1e-6)) if v25 else (lambda: LayerNorm(dim, 1e-6))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = VisionAttention(dim, vc.num_heads)
        if v25:
            self.mlp = VisionGatedMLP(dim, vc.intermediate_size, vc.hidden_act)
        else:
            self.mlp = VisionMLP(dim, int(dim * vc.mlp_ratio), vc.hidden_act)

    def forward(self, x, meta, rotary, table):
        x = x + self.attn(self.norm1(x), meta, rotary, table)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, out_dim: int, dim: int, merge: int, v25: bool):
        super().__init__()
        self.width = dim * merge * merge
        self.ln_q = RMSNorm(dim, 1e-6) if v25 else LayerNorm(dim, 1e-6)
        self.mlp = nn.Sequential(Linear(self.width, self.width, bias=True), Activation("gelu"),
                                 Linear(self.width, out_dim, bias=True))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.width))


def vision_positions(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(row, column) of every patch in the processor's order: 2x2 merge blocks row by row,
    each block's patches row by row; repeated per frame. -> [N, 2] int64"""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        hw = torch.stack((rows.transpose(1, 2).reshape(-1), cols.transpose(1, 2).reshape(-1)), dim=-1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def window_order(grids: list[tuple[int, int, int]], merge: int, window: int,
                 patch: int) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's attention windows: the order of merged tokens that puts each window's
    tokens together (windows of `window` pixels, row-major per image and frame; windows at the
    right and bottom edges may be partial), and the patch-level bounds of the windows."""
    side = window // merge // patch  # merged tokens per window side
    order, bounds, base = [], [0], 0
    unit = merge * merge
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).view(t, gh, gw)
        for f in range(t):
            for r0 in range(0, gh, side):
                for c0 in range(0, gw, side):
                    win = idx[f, r0:r0 + side, c0:c0 + side].reshape(-1)
                    order.append(win + base)
                    bounds.append(bounds[-1] + win.numel() * unit)
        base += t * gh * gw
    return torch.cat(order), bounds


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, vc, v25: bool):
        super().__init__()
        self.vc, self.v25 = vc, v25
        dim = vc.hidden_size if v25 else vc.embed_dim
        out = vc.out_hidden_size if v25 else vc.hidden_size
        self.merge = vc.spatial_merge_size
        self.patch_embed = PatchEmbed(vc, dim)
        theta = float((getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
        self.rotary_pos_emb = VisionRotaryEmbedding(dim // vc.num_heads, theta)
        self.blocks = nn.ModuleList(VisionBlock(vc, dim, v25) for _ in range(vc.depth))
        self.merger = PatchMerger(out, dim, self.merge, v25)
        self.full_blocks = set(getattr(vc, "fullatt_block_indexes", ()) or ()) if v25 else None

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """[N, C*T*P*P] patches of the images in `grids` -> [N / merge^2, out] merged tokens."""
        dev = patches.device
        x = self.patch_embed(patches)
        table = self.rotary_pos_emb.table(to_device_async(vision_positions(grids, self.merge), dev))
        frames = [0]  # full attention: within each frame of each image
        for t, h, w in grids:
            for _ in range(t):
                frames.append(frames[-1] + h * w)
        full = EncoderMetadata.of(frames, dev)
        windowed = order = None
        if self.v25:
            order, bounds = window_order(grids, self.merge, self.vc.window_size, self.vc.patch_size)
            order = to_device_async(order, dev)
            unit = self.merge * self.merge
            x = x.view(-1, unit, x.shape[-1])[order].reshape(x.shape)
            table = table.view(-1, unit, table.shape[-1])[order].reshape(table.shape)
            windowed = EncoderMetadata.of(bounds, dev)
        for i, blk in enumerate(self.blocks):
            meta = full if not self.v25 or i in self.full_blocks else windowed
            x = blk(x, meta, self.rotary_pos_emb, table)
        x = self.merger(x)
        if order is not None:
            x = x[torch.argsort(order)]
        return x


class Qwen2VLForConditionalGeneration(SupportsMultiModal):
    uses_mrope = True
    v25 = False
    weight_routes = (
        ("model.visual.", "visual", ""),
        ("visual.", "visual", ""),                                   # layout before transformers 5
        ("model.language_model.", "language_model", "model."),
        ("model.", "language_model", "model."),
        ("lm_head.", "language_model", "lm_head."),
    )

    def __init__(self, config, max_position: int | None = None):
        super().__init__()
        self.config = config
        self.visual = Qwen2VisionTransformer(config.vision_config, self.v25)
        self.language_model = Qwen2VLTextModel(text_config_of(config), max_position)
        self.image_token_id = int(config.image_token_id)
        self.merge = config.vision_config.spatial_merge_size

    @staticmethod
    def _grid(item) -> tuple[int, int, int]:
        t, h, w = (int(v) for v in item["image_grid_thw"].reshape(-1).tolist())
        return t, h, w

    def embed_multimodal(self, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        grids = [self._grid(it) for it in items]
        patches = torch.cat([it["pixel_values"] for it in items])
        merged = self.visual(patches, grids)
        return list(merged.split([self.num_image_embeds(it) for it in items]))

    def num_image_embeds(self, item) -> int:
        t, h, w = self._grid(item)
        return t * h * w // self.merge ** 2

    def profile_image_items(self, num_images, processor_config, device):
        vc = self.config.vision_config
        size = processor_config.get("size") or {}
        max_pixels = int(processor_config.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
        factor = vc.patch_size * self.merge
        side = max(factor, int(max_pixels ** 0.5) // factor * factor)
        g = side // vc.patch_size
        k = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        item = {"pixel_values": torch.zeros(g * g, k, device=device),
                "image_grid_thw": torch.tensor([[1, g, g]], device=device)}
        return [item] * num_images

    def mrope_positions(self, prompt_token_ids: list[int], features: list) -> tuple[np.ndarray, int]:
        n = len(prompt_token_ids)
        pos = np.empty((3, n), dtype=np.int64)
        at, cur = 0, 0  # next prompt index, next text position
        for f in sorted(features, key=lambda f: f.offset):
            if f.offset > at:  # text before the image
                pos[:, at:f.offset] = np.arange(cur, cur + f.offset - at)
                cur += f.offset - at
            t, h, w = self._grid({"image_grid_thw": f.data["image_grid_thw"].numpy()})  # noqa
            gh, gw = h // self.merge, w // self.merge
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            pos[:, f.offset:f.offset + f.length] = np.stack((tt, hh, ww)).reshape(3, -1) + cur
            cur += max(gh, gw)
            at = f.offset + f.length
        if at < n:
            pos[:, at:] = np.arange(cur, cur + n - at)
            cur += n - at
        return pos, int(cur - n)


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    v25 = True
