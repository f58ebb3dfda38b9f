"""The engine core's account of the vision encoder's outputs, which live in the worker.

Outputs are keyed by the image's content hash and measured in embedding rows. A request that
is scheduled over an image's placeholders references its output until its computed tokens
pass the image; an output nobody references stays cached (least recently released first out)
so a later request with the same image skips the encoder, until its room is needed. The
hashes dropped since the last step go to the worker with the next step, which frees them.

The scheduler asks `plan` which of a request's images a step's tokens cover and whether the
uncached ones fit in the step's encoder budget (--vision-max-batch-size images) and the cache;
a step stops before the first image that does not fit, so a placeholder range never runs
without its embeddings.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class EncoderStep:
    """What one step's scheduling has given the encoder so far."""
    max_images: int
    images: int = 0
    rows: int = 0                       # embedding rows of the images it encodes
    hashes: set[str] = field(default_factory=set)


class EncoderCacheManager:
    def __init__(self, capacity: int, max_images_per_step: int):
        self.capacity = capacity        # embedding rows
        self.max_images_per_step = max_images_per_step
        self.size: dict[str, int] = {}                 # cached hash -> rows
        self.refs: dict[str, set[str]] = {}            # cached hash -> requests using it
        self.unused: OrderedDict[str, None] = OrderedDict()  # cached, unreferenced (evictable)
        self.used_rows = 0
        self.freed: list[str] = []
        # cumulative counters (metrics)
        self.queries = 0
        self.hits = 0
        self.encoded = 0

    def new_step(self) -> EncoderStep:
        return EncoderStep(self.max_images_per_step)

    def _room(self) -> int:
        """Rows free now or after evicting every unreferenced output."""
        return self.capacity - self.used_rows + sum(self.size[h] for h in self.unused)

    def plan(self, req, start: int, n: int, step: EncoderStep) -> tuple[int, list[int], list[int]]:
        """How many of req's tokens [start, start + n) can run this step, the indices of the
        images they need that are cached (or encoded this step for another request), and of
        those this step must encode. Stops before the first image that does not fit."""
        hits, new = [], []
        rows, images = 0, step.images  # rows of this request's new images (the step's are cached)
        end = start + n
        for i, f in enumerate(req.mm_features or ()):
            if f.offset + f.length <= start or i in req.encoder_refs:
                continue
            if f.offset >= end:
                break
            h = f.identifier
            if h in self.size or h in step.hashes:
                hits.append(i)
                continue
            # an image larger than the whole cache runs alone, when nothing else is referenced
            alone = images == 0 and not any(self.refs.values())
            if images < step.max_images and (rows + f.num_embeds <= self._room() or alone):
                new.append(i)
                rows += f.num_embeds
                images += 1
                continue
            return max(f.offset - start, 0), hits, new
        return n, hits, new

    def commit(self, req, hits: list[int], new: list[int], step: EncoderStep) -> None:
        """The request was scheduled with the plan's images: reference them."""
        for i in hits + new:
            f = req.mm_features[i]
            h = f.identifier
            self.queries += 1
            if i in hits:
                self.hits += 1
            else:
                step.images += 1
                step.rows += f.num_embeds
                step.hashes.add(h)
                self.encoded += 1
                self._insert(h, f.num_embeds)
            self.refs.setdefault(h, set()).add(req.request_id)
            self.unused.pop(h, None)
            req.encoder_refs.add(i)

    def _insert(self, h: str, rows: int) -> None:
        while self.used_rows + rows > self.capacity and self.unused:
            old, _ = self.unused.popitem(last=False)
            self.used_rows -= self.size.pop(old)
            self.refs.pop(old, None)
            self.freed.append(old)
        self.size[h] = rows
        self.used_rows += rows

    def release_passed(self, req) -> None:
        """Drop req's references to the images its computed tokens are past."""
        if not req.encoder_refs:
            return
        done = req.num_computed_tokens
        for i in [i for i in req.encoder_refs if req.mm_features[i].offset + req.mm_features[i].length <= done]:
            self._release(req, i)

    def release_all(self, req) -> None:
        for i in list(req.encoder_refs):
            self._release(req, i)

    def _release(self, req, i: int) -> None:
        req.encoder_refs.discard(i)
        h = req.mm_features[i].identifier
        users = self.refs.get(h)
        if users is None:
            return
        users.discard(req.request_id)
        if not users:
            self.unused[h] = None
            self.unused.move_to_end(h)

    def take_freed(self) -> list[str]:
        out, self.freed = self.freed, []
        return out
