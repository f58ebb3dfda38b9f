"""GGUF blocks as a weight format of Linear and LMHead on the CPU: the file's Q4_0/Q4_1/Q5_0/
Q5_1/Q8_0/Q4_K/Q5_K/Q6_K rows are kept as they are and multiplied with directly
(pagoda/kernels/cpu_gguf.c), so a decode step reads the file's 4.5-8.5 bits a weight instead of
the 8-bit groups' 10. `--quantization int4` puts a float checkpoint in the same format (Q4_1).

Steps, as for every weight format of a layer: create (`GGUFLinearMethod(shard_sizes, k)`), load
(`load(shard, blocks)` per checkpoint tensor: the loader keeps a GGUF's blocks by HF name,
pagoda/worker/loader.py), process after loading (`process(bias)`: merged shards are
concatenated row-wise, one part per run of shards of one type), apply (`__call__`).

Activations stay float32: quantizing them to llama.cpp's 8-bit blocks (for an integer dot
product) changed the bundled model's greedy tokens at the 5th token of the fidelity prompts and
its top-5 logprobs by up to 0.69 (emulated in torch on this path's weights), far outside the 1e-4
pagoda holds to against transformers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from pagoda.kernels import cpu_gguf

Q4_1, Q8_0 = 3, 8  # ggml type ids


@dataclass
class GGUFBlocks:
    """One GGUF tensor's raw blocks: `data` rows [n, row_bytes] (uint8; a view of the file is
    fine), ggml `type`, `shape` (n, k) in torch order."""
    data: Union[np.ndarray, torch.Tensor]
    type: int
    shape: tuple[int, int]

    def tensor(self) -> torch.Tensor:
        """The rows as an owned, contiguous uint8 tensor."""
        if isinstance(self.data, torch.Tensor):
            return self.data.contiguous()
        return torch.from_numpy(np.array(self.data, dtype=np.uint8, copy=True))

    def dequantize(self) -> torch.Tensor:
        return cpu_gguf.dequantize_torch(self.tensor(), self.type)


def _joined(shards: list[GGUFBlocks]) -> torch.Tensor:
    """The shards' rows in order, copied once into one owned tensor (from the file's memory map
    where they are views of it; numpy copies on one thread, which a busy 2-core machine does not
    slow down as it does torch's two-thread copies)."""
    if len(shards) == 1:
        return shards[0].tensor()
    rows = [s.data.numpy() if isinstance(s.data, torch.Tensor) else s.data for s in shards]
    out = torch.empty((sum(r.shape[0] for r in rows), rows[0].shape[1]), dtype=torch.uint8)
    dst, i = out.numpy(), 0
    for r in rows:
        dst[i:i + r.shape[0]] = r
        i += r.shape[0]
    return out


def quantize(w: torch.Tensor, ggml_type: int = Q4_1) -> GGUFBlocks:
    """Float weights [n, k] -> GGUF blocks of `ggml_type`, by the gguf package's quantizer
    (llama.cpp's reference rounding)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize
    arr = gguf_quantize(w.detach().float().contiguous().numpy(), GGMLQuantizationType(ggml_type))
    return GGUFBlocks(torch.from_numpy(np.ascontiguousarray(arr)), ggml_type, tuple(w.shape))


def can_pack(ggml_type: int, k: int) -> bool:
    """Whether this CPU's kernel multiplies with rows of `k` weights of `ggml_type`."""
    return cpu_gguf.supports(ggml_type, k) and cpu_gguf.available()


class GGUFLinearMethod:
    """The packed weight of one Linear (merged shards included) or LMHead."""

    def __init__(self, shard_sizes: list[int], in_features: int):
        self.shard_sizes, self.k = list(shard_sizes), in_features
        self.n = sum(shard_sizes)
        self.blocks: list[Optional[GGUFBlocks]] = [None] * len(shard_sizes)
        self.parts: list[cpu_gguf.Part] = []
        self.c_parts = None
        self.bias: Optional[torch.Tensor] = None

    def load(self, shard: int, blocks: GGUFBlocks):
        if tuple(blocks.shape) != (self.shard_sizes[shard], self.k):
            raise ValueError(f"GGUF blocks of shape {tuple(blocks.shape)} for shard {shard} of "
                             f"({self.shard_sizes[shard]}, {self.k})")
        self.blocks[shard] = blocks

    def process(self, bias: Optional[torch.Tensor]) -> "GGUFLinearMethod":
        runs: list[tuple[int, int, list[GGUFBlocks]]] = []  # (type, first column, shards)
        col = 0
        for b, size in zip(self.blocks, self.shard_sizes):
            if runs and runs[-1][0] == b.type:
                runs[-1][2].append(b)
            else:
                runs.append((b.type, col, [b]))
            col += size
        self.parts = [cpu_gguf.Part(_joined(shards), t, c0) for t, c0, shards in runs]
        self.c_parts = cpu_gguf.make_parts(self.parts)
        self.bias = bias.float().contiguous() if bias is not None else None
        self.blocks = []
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = cpu_gguf.gguf_matmul(x.reshape(-1, shape[-1]), self.c_parts, self.k, self.n, self.bias)
        return y.to(x.dtype).reshape(*shape[:-1], self.n)


def pack(method: str, weight: torch.Tensor, shard_sizes: list[int], blocks: Optional[list],
         online_type: int) -> Optional[GGUFLinearMethod]:
    """The packed weight a layer takes under --quantization `method` (gguf | int4), unprocessed,
    or None: the checkpoint's own `blocks` (one per shard) when the kernel takes them all, else
    for int4 the float `weight` quantized to `online_type`."""
    if weight.device.type != "cpu":
        return None
    k = weight.shape[1]
    if blocks and all(b is not None and can_pack(b.type, k) for b in blocks):
        loaded = GGUFLinearMethod(shard_sizes, k)
        for i, b in enumerate(blocks):
            loaded.load(i, b)
        return loaded
    if method == "int4" and can_pack(online_type, k):
        online = GGUFLinearMethod([weight.shape[0]], k)
        online.load(0, quantize(weight.data, online_type))
        return online
    return None
