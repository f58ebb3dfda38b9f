"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`):
the image processor tiles an image (rows x columns of square tiles plus the whole image
resized, the global tile); each tile goes through a SigLIP ViT, the connector pixel-shuffles
each tile's patch grid (scale_factor^2 neighbours become one token of scale_factor^2 times
the width) and projects it to the language model (Llama / SmolLM2). In the prompt each tile
is `<fake_token_around_image><row_i_col_j>` + image_seq_len `<image>` tokens; the row/column
tokens stay text, only the `<image>` positions take embeddings.
"""
from __future__ import annotations

import torch
from torch import nn

from pagoda.layers.linear import Linear
from pagoda.models.interfaces import SupportsMultiModal, build_language_model, text_config_of
from pagoda.models.siglip import SiglipVisionModel


class Idefics3Connector(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.scale = int(config.scale_factor)
        vis, txt = config.vision_config.hidden_size, config.text_config.hidden_size
        self.modality_projection = nn.Module()
        self.modality_projection.proj = Linear(vis * self.scale ** 2, txt)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[B, side*side, D] -> [B, side*side / s^2, D * s^2]: each s x s block of patches
        becomes one token, in transformers' order of its features."""
        B, n, D = x.shape
        side, s = int(n ** 0.5), self.scale
        x = x.view(B, side, side // s, D * s).permute(0, 2, 1, 3)
        x = x.reshape(B, side // s, side // s, D * s * s).permute(0, 2, 1, 3)
        return x.reshape(B, n // (s * s), D * s * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modality_projection.proj(self.pixel_shuffle(x))


class Idefics3ForConditionalGeneration(SupportsMultiModal):
    weight_routes = (
        ("model.vision_model.", "vision_model", ""),
        ("model.connector.", "connector", ""),
        ("model.text_model.", "language_model", "model."),
        ("lm_head.", "language_model", "lm_head."),
    )

    def __init__(self, config, max_position: int | None = None):
        super().__init__()
        self.config = config
        self.vision_model = SiglipVisionModel(config.vision_config)
        self.connector = Idefics3Connector(config)
        self.language_model = build_language_model(text_config_of(config), max_position)
        self.image_token_id = int(config.image_token_id)

    def embed_multimodal(self, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        tiles = torch.cat([it["pixel_values"] for it in items])
        for it in items:
            mask = it.get("pixel_attention_mask")
            if mask is not None and not bool(mask.all()):
                raise ValueError("image tiles with padding (a partial pixel_attention_mask) are not "
                                 "supported")
        feats = self.connector(self.vision_model(tiles))       # [tiles, tokens, hidden]
        sizes = [it["pixel_values"].shape[0] for it in items]
        return [f.reshape(-1, f.shape[-1]) for f in feats.split(sizes)]

    def num_image_embeds(self, item) -> int:
        tiles, _, h, w = item["pixel_values"].shape
        p, s = self.config.vision_config.patch_size, self.connector.scale
        return tiles * (h // p) * (w // p) // (s * s)

    def profile_image_items(self, num_images, processor_config, device):
        vc = self.config.vision_config
        tile = int((processor_config.get("max_image_size") or {}).get("longest_edge") or vc.image_size)
        longest = int((processor_config.get("size") or {}).get("longest_edge") or tile)
        n = (-(-longest // tile)) ** 2 + 1  # the most tiles the processor cuts, plus the global one
        item = {"pixel_values": torch.zeros(n, vc.num_channels, tile, tile, device=device)}
        return [item] * num_images


class SmolVLMForConditionalGeneration(Idefics3ForConditionalGeneration):
    """Same model; its processor writes the prompt differently (no row/column tiles for a
    small image, <global-img> before the global tile)."""
