"""GET /v1/models and /v1/models/{id}: the names this server answers to (--served-model-name)."""
from __future__ import annotations

import time

from .errors import model_not_found
from .protocol import ModelCard, ModelList
from .serving_base import OpenAIServing


class ServingModels:
    def __init__(self, serving: OpenAIServing):
        self.s = serving
        self.created = int(time.time())

    def _card(self, name: str) -> ModelCard:
        mc = self.s.engine.model_config
        return ModelCard(id=name, created=self.created, root=mc.model, max_model_len=self.s.max_model_len,
                         capabilities=["vision"] if mc.is_multimodal else None)

    def list(self) -> ModelList:
        return ModelList(data=[self._card(n) for n in self.s.served_model_names])

    def get(self, model_id: str) -> ModelCard:
        if model_id not in self.s.served_model_names:
            raise model_not_found(model_id)
        return self._card(model_id)
