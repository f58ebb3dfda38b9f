"""What the model runner asks of a model beyond text: `SupportsMultiModal`.

A vision-language model turns each image's processor outputs (pixel values, grid sizes: the
per-image dicts the front end prepared, as tensors on the device) into one embedding row per
placeholder token (`embed_multimodal`), and its language model takes `inputs_embeds` in which
those rows replace the placeholders' token embeddings. Models with M-RoPE (Qwen2-VL) also give
each prompt token three rotary positions (`mrope_positions`); their text tokens after the
prompt continue at position + delta.

The base class holds the plumbing every family shares: the language model behind forward /
compute_logits / attention_layers, and weight loading routed by checkpoint prefix to the vision
tower, the projector and the language model.
"""
from __future__ import annotations

from typing import ClassVar, Iterable, Optional

import numpy as np
import torch
from torch import nn

from pagoda.models.weights import expected_names, load_named


def text_config_of(config):
    """The language model's config of a composite one, with the composite's tie flag (saved
    at the top level since transformers 5)."""
    import copy
    text = copy.copy(config.text_config)
    if getattr(config, "tie_word_embeddings", False):
        text.tie_word_embeddings = True
    return text


def build_language_model(text_config, max_position: Optional[int]):
    from pagoda.models.registry import resolve_model_class
    return resolve_model_class(text_config)(text_config, max_position)


class SupportsMultiModal(nn.Module):
    supports_multimodal: ClassVar[bool] = True
    uses_mrope: ClassVar[bool] = False
    # (checkpoint prefix, submodule, prefix the submodule's loader expects); longest match wins
    weight_routes: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    language_model: nn.Module
    image_token_id: int

    # -- text side: the language model ----------------------------------------------------
    def attention_layers(self):
        return self.language_model.attention_layers()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.language_model(input_ids, positions, inputs_embeds)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(h)

    # -- images ---------------------------------------------------------------------------
    def embed_multimodal(self, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """One [num_embeds, text_hidden] tensor per image."""
        raise NotImplementedError

    def num_image_embeds(self, item: dict[str, torch.Tensor]) -> int:
        """Embedding rows embed_multimodal gives for this image's inputs."""
        raise NotImplementedError

    def profile_image_items(self, num_images: int, processor_config: dict,
                            device: torch.device) -> list[dict[str, torch.Tensor]]:
        """Inputs of `num_images` images of the largest size the image processor produces."""
        raise NotImplementedError

    def mrope_positions(self, prompt_token_ids: list[int],
                        features: list) -> tuple[np.ndarray, int]:
        """([3, num_prompt] positions, delta): models with uses_mrope only."""
        raise NotImplementedError

    # -- weights --------------------------------------------------------------------------
    def _route(self, name: str) -> tuple[str, str]:
        best = None
        for prefix, sub, new in self.weight_routes:
            if name.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
                best = (prefix, sub, new)
        if best is None:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
        prefix, sub, new = best
        return sub, new + name[len(prefix):]

    def skips(self, sub: str, name: str) -> bool:
        """Checkpoint tensors of `sub` this model leaves out (e.g. vision layers past the one
        whose features it reads)."""
        return False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            sub, local = self._route(name)
            if sub is None or self.skips(sub, local):  # parts this model does not run
                continue
            module = getattr(self, sub)
            if sub == "language_model":
                got = module.load_weights([(local, tensor)])
            else:
                got = load_named(module, [(local, tensor)])
            loaded |= {f"{sub}.{n}" for n in got}
        return loaded

    def expected_weights(self) -> set[str]:
        names: set[str] = set()
        for sub in dict.fromkeys(s for _, s, _ in self.weight_routes if s is not None):
            module = getattr(self, sub)
            got = module.expected_weights() if sub == "language_model" else expected_names(module)
            names |= {f"{sub}.{n}" for n in got}
        return names
