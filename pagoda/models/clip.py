"""CLIP's vision transformer (LLaVA's vision tower), and the encoder block it shares with SigLIP.

Per image: a patch convolution (kernel = stride = patch size), a CLS embedding in front,
learned position embeddings, a pre-LayerNorm, then pre-norm blocks of bidirectional attention
over the image's own patches (pagoda's EncoderAttention, one sequence per image) and a
two-layer MLP. Only the layers up to the feature layer a model reads are built.
"""
from __future__ import annotations

import torch
from torch import nn

from pagoda.layers.activation import Activation
from pagoda.layers.attention import EncoderAttention, EncoderMetadata
from pagoda.layers.linear import Linear
from pagoda.layers.norm import LayerNorm


class PatchConv(nn.Module):
    """Conv2d with kernel == stride (patchify + project), weights named as nn.Conv2d's."""

    def __init__(self, channels: int, hidden: int, patch: int, bias: bool):
        super().__init__()
        self.patch = patch
        self.weight = nn.Parameter(torch.empty(hidden, channels, patch, patch), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden), requires_grad=False) if bias else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H / p) * (W / p), hidden] in raster order."""
        x = torch.nn.functional.conv2d(pixels.to(self.weight.dtype), self.weight, self.bias,
                                       stride=self.patch)
        return x.flatten(2).transpose(1, 2)


class VisionMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act: str):
        super().__init__()
        self.fc1 = Linear(hidden, inter, bias=True)
        self.act = Activation(act)
        self.fc2 = Linear(inter, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionSelfAttention(nn.Module):
    """q/k/v (merged) and out projections around EncoderAttention; names as CLIP's / SigLIP's."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv_proj = Linear(hidden, 3 * hidden, bias=True, shard_sizes=[hidden] * 3)
        self.out_proj = Linear(hidden, hidden, bias=True)
        self.attn = EncoderAttention(heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).view(T, 3, self.heads, self.head_dim).unbind(1)
        return self.out_proj(self.attn(q, k, v, meta).reshape(T, -1))


class VisionEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x)) (CLIP, SigLIP, Idefics3)."""

    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.layer_norm1 = LayerNorm(h, config.layer_norm_eps)
        self.self_attn = VisionSelfAttention(h, config.num_attention_heads)
        self.layer_norm2 = LayerNorm(h, config.layer_norm_eps)
        self.mlp = VisionMLP(h, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor, meta: EncoderMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), meta)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(num_layers))


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(h), requires_grad=False)
        self.patch_embedding = PatchConv(config.num_channels, h, config.patch_size, bias=False)
        n = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = nn.Embedding(n, h)
        self.position_embedding.weight.requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1 + patches, hidden]"""
        patches = self.patch_embedding(pixels)
        if patches.shape[1] + 1 != self.position_embedding.weight.shape[0]:
            raise ValueError(f"image of {tuple(pixels.shape[-2:])} pixels does not match the vision "
                             f"tower's {self.position_embedding.weight.shape[0] - 1} patches")
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat((cls, patches), dim=1) + self.position_embedding.weight


def layers_to_run(config, feature_layers: list[int]) -> int:
    """Encoder layers needed for hidden states `feature_layers` (0 = the embeddings, i = the
    output of layer i, negative from the end as transformers counts hidden_states)."""
    n = config.num_hidden_layers
    return max(f if f >= 0 else n + 1 + f for f in feature_layers)


class CLIPVisionModel(nn.Module):
    def __init__(self, config, feature_layers: list[int]):
        super().__init__()
        self.config = config
        n = config.num_hidden_layers
        self.feature_layers = [f if f >= 0 else n + 1 + f for f in feature_layers]
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.encoder = VisionEncoder(config, layers_to_run(config, feature_layers))

    def skips(self, name: str) -> bool:
        """Checkpoint tensors of parts this tower does not run (later layers, the pooler)."""
        if name.startswith("post_layernorm."):
            return True
        if name.startswith("encoder.layers."):
            return int(name.split(".")[2]) >= len(self.encoder.layers)
        return False

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1 + patches, hidden * len(feature_layers)]: the hidden states of
        the feature layers (CLS first), concatenated along features."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        B, L, H = x.shape
        meta = EncoderMetadata.of([i * L for i in range(B + 1)], x.device)
        x = x.reshape(B * L, H)
        states: dict[int, torch.Tensor] = {0: x}
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x, meta)
            states[i + 1] = x
        out = torch.cat([states[f] for f in self.feature_layers], dim=-1)
        return out.view(B, L, -1)


def feature_layer_list(value) -> list[int]:
    return [value] if isinstance(value, int) else list(value)

