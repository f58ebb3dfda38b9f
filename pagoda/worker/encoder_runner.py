"""The vision encoder's side of the model runner (models with `supports_multimodal`).

Each request's images arrive once, with the request (`mm_features`: placeholder range, hash,
processor outputs). Before a step's forward pass the images whose placeholders the step
covers are encoded, those not in the encoder cache, in one batch (the scheduler keeps that
batch within --vision-max-batch-size and tells us which hashes it has dropped); the outputs stay
here, keyed by hash, for every chunk and every request that covers the same image. The step's
input embeddings are the token embeddings with the image rows put where the placeholders are.

Models with M-RoPE get each prompt's (t, h, w) positions once per request; text past the
prompt continues at position + delta (three equal positions, i.e. plain 1-D rotary).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from pagoda.layers.attention import to_device_async
from pagoda.sample.ops import to_device


@dataclass
class RequestImages:
    """The images of one request, as the worker keeps them."""
    features: list                     # MultiModalFeature-like (identifier, offset, length, data)
    embed_rows: list[np.ndarray]       # per image: for each position of its range, its encoder
                                       # row (-1: a text token inside the range)
    mrope: Optional[np.ndarray] = None  # [3, num_prompt] positions (M-RoPE models)
    mrope_delta: int = 0


def tensor_of(t, device: torch.device) -> torch.Tensor:
    """A wire Tensor (dtype, shape, bytes) on the device."""
    if t.dtype == "bfloat16":
        x = torch.frombuffer(bytearray(t.data), dtype=torch.bfloat16).view(t.shape)
    else:
        x = torch.from_numpy(np.array(t.numpy()))
    return to_device_async(x, device)


@dataclass
class EncoderRunner:
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    cache: dict[str, torch.Tensor] = field(default_factory=dict)   # hash -> [num_embeds, hidden]
    requests: dict[str, RequestImages] = field(default_factory=dict)
    # (start, end) timing marks of this step's encoder runs: CUDA events or perf_counter floats
    timings: list = field(default_factory=list)

    # -- requests -------------------------------------------------------------------------
    def add_request(self, req_id: str, prompt_token_ids: list[int], features: Optional[list]) -> None:
        if not features:
            return
        ids = np.asarray(prompt_token_ids)
        tok = self.model.image_token_id
        rows = []
        for f in features:
            span = ids[f.offset:f.offset + f.length] == tok
            if int(span.sum()) != f.num_embeds:
                raise ValueError(f"image {f.identifier[:12]}: {int(span.sum())} image tokens in its "
                                 f"placeholder range, {f.num_embeds} expected")
            rows.append(np.where(span, np.cumsum(span) - 1, -1))
        images = RequestImages(list(features), rows)
        if getattr(self.model, "uses_mrope", False):
            images.mrope, images.mrope_delta = self.model.mrope_positions(prompt_token_ids, features)
        self.requests[req_id] = images

    def remove_request(self, req_id: str) -> None:
        self.requests.pop(req_id, None)

    def free(self, hashes) -> None:
        for h in hashes:
            self.cache.pop(h, None)

    # -- encoding -------------------------------------------------------------------------
    def _items(self, f) -> dict[str, torch.Tensor]:
        """An image's inputs: pixel values on the device in the model's dtype; sizes and masks
        stay on the host, where the model reads them without waiting for the device."""
        out = {}
        for k, t in f.data.items():
            if t.dtype.startswith(("float", "bfloat")):
                out[k] = tensor_of(t, self.device).to(self.dtype)
            else:
                out[k] = torch.from_numpy(np.array(t.numpy()))
        return out

    def encode(self, todo: list) -> None:
        """Run the encoder on features (deduplicated by hash) in one batch."""
        if not todo:
            return
        cuda = self.device.type == "cuda"
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        outs = self.model.embed_multimodal([self._items(f) for f in todo])
        for f, e in zip(todo, outs):
            if e.shape[0] != f.num_embeds:
                raise ValueError(f"image {f.identifier[:12]}: the encoder gave {e.shape[0]} rows for "
                                 f"{f.num_embeds} placeholders")
            self.cache[f.identifier] = e
        if cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self.timings.append((start, end))

    @torch.inference_mode()
    def profile_peak(self, items: list[dict[str, torch.Tensor]]) -> int:
        """Peak CUDA memory of one encoder run on these inputs."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        out = self.model.embed_multimodal([{k: v.to(self.dtype) if v.is_floating_point() else v
                                            for k, v in it.items()} for it in items])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del out
        torch.cuda.empty_cache()
        return peak

    def take_timings(self) -> list:
        t, self.timings = self.timings, []
        return t

    @staticmethod
    def seconds(timings: list) -> list[float]:
        """Encoder run times (CUDA events: waits for each run's end, nothing later)."""
        out = []
        for a, b in timings:
            if isinstance(a, torch.cuda.Event):
                b.synchronize()
                out.append(a.elapsed_time(b) / 1e3)
            else:
                out.append(b - a)
        return out

    def _covered(self, req_ids, starts, counts):
        """(request index, image index, first, end) of each image range the step's tokens
        [start, start + count) of each request overlap."""
        for i, rid in enumerate(req_ids):
            images = self.requests.get(rid)
            if images is None:
                continue
            a, b = int(starts[i]), int(starts[i]) + int(counts[i])
            for j, f in enumerate(images.features):
                lo, hi = max(a, f.offset), min(b, f.offset + f.length)
                if lo < hi:
                    yield i, images, j, lo, hi

    def prepare(self, req_ids, starts, counts) -> bool:
        """Encode the images this step needs that are not cached yet; whether the step covers
        any image placeholder."""
        todo, seen, covered = [], set(), False
        for _, images, j, _, _ in self._covered(req_ids, starts, counts):
            covered = True
            f = images.features[j]
            if f.identifier not in self.cache and f.identifier not in seen:
                seen.add(f.identifier)
                todo.append(f)
        self.encode(todo)
        return covered

    def inputs_embeds(self, req_ids, starts, counts, row0, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """The step's input embeddings with image rows in place, or None when the step covers
        no image placeholder. row0[i]: request i's first row in the flat batch."""
        dst, srcs = [], []
        for i, images, j, lo, hi in self._covered(req_ids, starts, counts):
            f = images.features[j]
            rows = images.embed_rows[j][lo - f.offset:hi - f.offset]
            keep = rows >= 0
            if not keep.any():
                continue
            pos = np.arange(lo, hi)[keep]
            dst.append(pos - int(starts[i]) + int(row0[i]))
            srcs.append((self.cache[f.identifier], rows[keep]))
        if not dst:
            return None
        embeds = self.model.embed_input_ids(input_ids)
        index = to_device(np.concatenate(dst).tolist(), torch.long, self.device)
        rows = torch.cat([e[to_device(r.tolist(), torch.long, self.device)] for e, r in srcs])
        embeds[index] = rows.to(embeds.dtype)
        return embeds

    # -- M-RoPE ---------------------------------------------------------------------------
    def rope_positions(self, req_ids, positions: np.ndarray, counts, row0) -> Optional[np.ndarray]:
        """Rotary positions of the step's tokens: None when they are the sequence positions,
        [T] when every token's three positions are equal, else [3, T]."""
        if not getattr(self.model, "uses_mrope", False):
            return None
        rope = None
        for i, rid in enumerate(req_ids):
            images = self.requests.get(rid)
            if images is None:
                continue
            a, n = int(row0[i]), int(counts[i])
            p = positions[a:a + n]
            n_prompt = images.mrope.shape[1]
            if rope is None:
                rope = np.broadcast_to(positions, (3, len(positions))).copy()
            in_prompt = p < n_prompt
            rope[:, a:a + n] = p + images.mrope_delta
            if in_prompt.any():
                rope[:, a:a + n][:, in_prompt] = images.mrope[:, p[in_prompt]]
        if rope is None:
            return None
        if (rope[0] == rope[1]).all() and (rope[0] == rope[2]).all():
            return rope[0].copy()
        return rope
