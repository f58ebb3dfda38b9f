"""Hidden states of a flattened batch -> one vector per input, as sentence-transformers computes it,
and (``Pooler``) the per-request task on top: embeddings, class probabilities, scores.

An embedding checkpoint says how it wants to be pooled in its sentence-transformers files:
``modules.json`` lists the pipeline (Transformer -> Pooling -> optional Normalize) and the
Pooling module's ``config.json`` turns modes on (``pooling_mode_mean_tokens``, ...). Several
modes on at once are concatenated in sentence-transformers' order. A module we do not implement
(Dense, a second LayerNorm, ...) is refused: a silently different vector would be worse than
an error.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

import torch
import torch.nn.functional as F

# sentence-transformers' config key -> our mode name, in the order it concatenates them
_MODE_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
MODES = ("cls", "max", "mean", "mean_sqrt_len", "lasttoken")
_ST_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class PoolingConfig:
    modes: tuple[str, ...] = ("mean",)
    normalize: bool = True

    def __post_init__(self):
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"pooling mode(s) {bad or '(none)'} not supported; supported: "
                             f"{', '.join(MODES)}")

    @classmethod
    def from_model_dir(cls, path: str, default_mode: str = "mean") -> "PoolingConfig":
        """Read sentence-transformers' modules.json + Pooling config; without them: the
        architecture's default mode, L2-normalized (what embedding APIs return)."""
        modules_file = os.path.join(path, "modules.json")
        if not os.path.exists(modules_file):
            return cls((default_mode,), True)
        with open(modules_file) as f:
            modules = json.load(f)
        kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
        unknown = [m["type"] for m, k in zip(modules, kinds) if k not in _ST_MODULES]
        if unknown:
            raise ValueError(f"--model: sentence-transformers module(s) {', '.join(unknown)} in "
                             f"{modules_file} are not supported (only {', '.join(_ST_MODULES)})")
        modes: tuple[str, ...] = (default_mode,)
        for m, kind in zip(modules, kinds):
            if kind == "Pooling":
                with open(os.path.join(path, m.get("path", ""), "config.json")) as f:
                    cfg = json.load(f)
                modes = tuple(name for key, name in _MODE_KEYS.items() if cfg.get(key))
        return cls(modes, "Normalize" in kinds)


def pool(hidden: torch.Tensor, starts: list[int], lens: list[int], config: PoolingConfig,
         normalize: list[bool] | None = None) -> torch.Tensor:
    """hidden [T, H] of a flattened batch; input i owns rows starts[i] : starts[i] + lens[i].
    Returns [B, H * modes], float32, L2-normalized per the config (or per input, if
    `normalize` is given: a request's PoolingParams may override the model's default)."""
    dev = hidden.device
    B = len(starts)
    if all(m in ("cls", "lasttoken") for m in config.modes):  # one row per input: gather it only
        first = torch.tensor(starts, device=dev)
        last = first + torch.tensor(lens, device=dev) - 1
        hidden = torch.cat([hidden[first if m == "cls" else last] for m in config.modes], dim=-1)
        return _normalized(hidden.float(), config, normalize, B)
    h = hidden.float()
    seg = torch.repeat_interleave(torch.arange(B, device=dev), torch.tensor(lens, device=dev))
    first = torch.tensor(starts, device=dev)
    counts = torch.tensor(lens, device=dev, dtype=torch.float32).unsqueeze(1)
    parts = []
    for mode in config.modes:
        if mode == "cls":
            parts.append(h[first])
        elif mode == "max":
            parts.append(torch.stack([h[s:s + n].amax(0) for s, n in zip(starts, lens)]))
        elif mode in ("mean", "mean_sqrt_len"):
            rows = torch.cat([torch.arange(s, s + n, device=dev) for s, n in zip(starts, lens)])
            total = torch.zeros(B, h.shape[1], device=dev).index_add_(0, seg, h[rows])
            parts.append(total / (counts.clamp(min=1e-9) if mode == "mean" else counts.sqrt()))
        else:  # lasttoken
            parts.append(h[first + torch.tensor(lens, device=dev) - 1])
    out = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    return _normalized(out, config, normalize, B)


def _normalized(out: torch.Tensor, config: PoolingConfig, normalize: list[bool] | None,
                B: int) -> torch.Tensor:
    dev = out.device
    norm = [config.normalize] * B if normalize is None else normalize
    if all(norm):
        return F.normalize(out, p=2, dim=-1)
    if any(norm):
        keep = torch.tensor(norm, device=dev).unsqueeze(1)
        return torch.where(keep, F.normalize(out, p=2, dim=-1), out)
    return out


class Pooler:
    """One step's pooling requests -> one host array each, by each request's PoolingParams.

    Without `classify` (embedding models): the configured pooling, then per request the first
    `dimensions` values (Matryoshka) and L2 normalization (the model's default unless
    `normalize` says otherwise). With `classify` (the model's head on the pooled token): logits,
    turned into probabilities unless `activation` is off — softmax over the labels, or the
    sigmoid of a one-label head (cross-encoder scores).
    """

    def __init__(self, config: PoolingConfig,
                 classify: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.config = config
        self.classify = classify

    def __call__(self, hidden: torch.Tensor, starts: list[int], lens: list[int],
                 params: list) -> list[np.ndarray]:
        pooled = pool(hidden, starts, lens, self.config, [False] * len(starts))
        if self.classify is not None:
            logits = self.classify(pooled.to(hidden.dtype)).float()
            act = torch.tensor([p.use_activation for p in params], device=logits.device).unsqueeze(1)
            probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=-1)
            return list(torch.where(act, probs, logits).cpu().numpy())
        norm = [self.config.normalize if p.normalize is None else p.normalize for p in params]
        if all(p.dimensions is None for p in params):
            keep = torch.tensor(norm, device=pooled.device).unsqueeze(1)
            return list(torch.where(keep, F.normalize(pooled, p=2, dim=-1), pooled).cpu().numpy())
        out = []
        for row, p, n in zip(pooled, params, norm):
            row = row[:p.dimensions]  # dimensions None: the whole vector
            out.append((F.normalize(row, p=2, dim=-1) if n else row).cpu().numpy())
        return out
