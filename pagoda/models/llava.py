"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP ViT, the hidden states of its
`vision_feature_layer` (CLS dropped with vision_feature_select_strategy "default"), a
two-layer MLP projector into the language model's width, and a text model (Llama for LLaVA-1.5;
any pagoda text model the text config names). The prompt's `<image>` is expanded to one
placeholder per patch, whose embeddings the projected features replace.
"""
from __future__ import annotations

import torch
from torch import nn

from pagoda.layers.activation import Activation
from pagoda.layers.linear import Linear
from pagoda.models.clip import CLIPVisionModel, feature_layer_list
from pagoda.models.interfaces import SupportsMultiModal, build_language_model, text_config_of


class LlavaProjector(nn.Module):
    def __init__(self, config, num_feature_layers: int):
        super().__init__()
        vis, txt = config.vision_config.hidden_size, config.text_config.hidden_size
        bias = bool(getattr(config, "multimodal_projector_bias", True))
        self.linear_1 = Linear(vis * num_feature_layers, txt, bias=bias)
        self.act = Activation(config.projector_hidden_act)
        self.linear_2 = Linear(txt, txt, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(SupportsMultiModal):
    weight_routes = (
        ("model.vision_tower.", "vision_tower", ""),
        ("vision_tower.vision_model.", "vision_tower", ""),          # llava-hf checkpoints
        ("vision_tower.", "vision_tower", ""),                       # transformers 5's save
        ("model.multi_modal_projector.", "multi_modal_projector", ""),
        ("multi_modal_projector.", "multi_modal_projector", ""),
        ("model.language_model.", "language_model", "model."),
        ("language_model.model.", "language_model", "model."),
        ("language_model.lm_head.", "language_model", "lm_head."),
        ("lm_head.", "language_model", "lm_head."),
    )

    def __init__(self, config, max_position: int | None = None):
        super().__init__()
        self.config = config
        layers = feature_layer_list(config.vision_feature_layer)
        self.select = config.vision_feature_select_strategy
        if self.select not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {self.select!r} is not supported")
        self.vision_tower = CLIPVisionModel(config.vision_config, layers)
        self.multi_modal_projector = LlavaProjector(config, len(layers))
        self.language_model = build_language_model(text_config_of(config), max_position)
        self.image_token_id = int(config.image_token_id)

    def skips(self, sub: str, name: str) -> bool:
        return sub == "vision_tower" and self.vision_tower.skips(name)

    def embed_multimodal(self, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        pixels = torch.stack([it["pixel_values"] for it in items])
        feats = self.vision_tower(pixels)
        if self.select == "default":
            feats = feats[:, 1:]
        return list(self.multi_modal_projector(feats).unbind(0))

    def num_image_embeds(self, item) -> int:
        h, w = item["pixel_values"].shape[-2:]
        p = self.config.vision_config.patch_size
        return (h // p) * (w // p) + (self.select == "full")

    def profile_image_items(self, num_images, processor_config, device):
        vc = self.config.vision_config
        px = torch.zeros(vc.num_channels, vc.image_size, vc.image_size, device=device)
        return [{"pixel_values": px} for _ in range(num_images)]
