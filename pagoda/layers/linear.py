"""Linear layers. Merged projections (q|k|v, gate|up) load their shards from the checkpoint's
separate tensors.

Weight formats (`quantize_packed` / `quantize_int8`, after loading; pagoda/worker/loader.py
picks), each cutting the bytes a decode step reads, which is what a decode step on the CPU is
bound by:
- --quantization gguf: a GGUF's own blocks (Q4_0 ... Q6_K), kept packed on the CPU and multiplied
  with directly (layers/quantization/gguf.py); `int4` puts float weights in that format (Q4_1);
- int8: on the CPU 8 bits in groups of 32 along K with a scale and minimum each and
  float32 activations, through our AVX2 kernel (pagoda/kernels/cpu_int8.c). fbgemm's dynamic int8
  is about as fast but scales activations per tensor, and greedy outputs then diverged from
  float32 at the first token on most C1 prompts; on CUDA, per output channel and weight-only
  (torch's int8 weight-only kernel).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from pagoda.kernels import cpu_int8
from pagoda.layers.quantization import gguf as gguf_format


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: returns (int8 weights, float32 scales)."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous(), scales


def int8_supported(w: torch.Tensor) -> bool:
    """Whether Int8Matmul can hold this weight (the CPU kernel needs K % 32 == 0 and AVX2)."""
    if w.device.type != "cpu":
        return True
    return w.shape[1] % cpu_int8.GROUP == 0 and cpu_int8.available()


class Int8Matmul:
    """x @ w.T with w held as int8, for the device the weight lives on."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, groups=None):
        """`groups`: the CPU format (q, scale, min) already at hand, e.g. read from a GGUF's blocks."""
        self.out_features = w.shape[0]
        self.bias = bias
        self.cpu = w.device.type == "cpu"
        if self.cpu:
            self.qweight, self.scales, self.mins = (groups if groups is not None
                                                    else cpu_int8.quantize_weight(w))
            self.bias = bias.float().contiguous() if bias is not None else None
        else:
            q, scales = int8_per_channel(w)
            self.qweight, self.scales = q, scales.to(w.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.cpu:
            y = cpu_int8.int8_matmul(x2, self.qweight, self.scales, self.mins, self.bias).to(x.dtype)
        else:
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scales)
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 shard_sizes: list[int] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        # output rows of each shard of a merged projection, in order
        self.shard_sizes = shard_sizes or [out_features]
        self.int8: Int8Matmul | None = None
        self.gguf: gguf_format.GGUFLinearMethod | None = None  # packed GGUF blocks (CPU)

    def load_full(self, param: str, tensor: torch.Tensor):
        """A checkpoint tensor for the whole (unmerged) layer."""
        self.load_shard(0, param, tensor)

    def load_shard(self, shard: int, param: str, tensor: torch.Tensor):
        start = sum(self.shard_sizes[:shard])
        size = self.shard_sizes[shard]
        target = self.weight if param == "weight" else self.bias
        if target is None:
            raise ValueError(f"checkpoint has a {param} the model does not expect")
        if tensor.shape[0] != size or (param == "weight" and tensor.shape[1] != self.in_features):
            raise ValueError(f"shape mismatch: checkpoint {tuple(tensor.shape)} vs shard {shard} of "
                             f"{tuple(target.shape)}")
        target.data[start:start + size].copy_(tensor)

    def quantize_int8(self, groups=None):
        """int8 weights; `groups`: the CPU format (q, scale, min) already at hand, e.g. read from
        a GGUF's blocks."""
        if not int8_supported(self.weight):
            return  # stays float (logged once by the kernel loader)
        self.int8 = Int8Matmul(self.weight.data, self.bias.data if self.bias is not None else None, groups)
        self.weight = None

    def quantize_packed(self, method: str, blocks=None):
        """--quantization gguf | int4: the checkpoint's GGUF blocks of each shard (`blocks`, in
        order, None where the loader gave floats) kept packed when the kernel takes them all;
        else int4 packs the floats as Q4_1, and gguf falls back to int8."""
        bias = self.bias.data if self.bias is not None else None
        packed = gguf_format.pack(method, self.weight, self.shard_sizes, blocks, gguf_format.Q4_1)
        if packed is None:
            self.quantize_int8()
            return
        self.gguf = packed.process(bias)
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gguf is not None:
            return self.gguf(x)
        if self.int8 is not None:
            return self.int8(x)
        return F.linear(x, self.weight, self.bias)


# -- tensor parallelism ------------------------------------------------------------------------
# A column-parallel layer keeps its rank's rows of every shard (outputs stay local); a
# row-parallel layer keeps its rank's columns and sums the partial outputs over the ranks.
# Both read only their slice of each checkpoint tensor (`tensor[a:b]` on a safetensors slice
# reads just those bytes). With one rank they are plain Linear layers.

def _narrow_rows(tensor, start: int, size: int) -> torch.Tensor:
    t = tensor[start:start + size]
    return t if isinstance(t, torch.Tensor) else torch.as_tensor(t)


class ColumnParallelLinear(Linear):
    """Output features split over the ranks. `shard_parts[i]`: how many pieces shard i is cut
    into (the ranks' count, or fewer: KV heads that are fewer than the ranks are replicated,
    rank r keeping piece r * parts // ranks)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 shard_sizes: list[int] | None = None, shard_parts: list[int] | None = None):
        from pagoda.distributed.parallel_state import tp_rank, tp_size
        full = shard_sizes or [out_features]
        n, r = tp_size(), tp_rank()
        parts = shard_parts or [n] * len(full)
        for size, p in zip(full, parts):
            if size % p:
                raise ValueError(f"--tensor-parallel-size: {size} output features do not split into "
                                 f"{p} equal parts")
        local = [size // p for size, p in zip(full, parts)]
        super().__init__(in_features, sum(local), bias, local)
        self.full_shard_sizes = full
        # where this rank's rows of each full shard start
        self._starts = [(r * p // n) * (size // p) for size, p in zip(full, parts)]

    def load_shard(self, shard: int, param: str, tensor):
        size = self.shard_sizes[shard]
        super().load_shard(shard, param, _narrow_rows(tensor, self._starts[shard], size))


class RowParallelLinear(Linear):
    """Input features split over the ranks; each computes a partial sum, all-reduced. Each rank
    holds bias / ranks, so the sum adds the bias once (exactly, for a power-of-two rank count)
    whatever format the weight is kept in."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        from pagoda.distributed.parallel_state import tp_rank, tp_size
        n = tp_size()
        if in_features % n:
            raise ValueError(f"--tensor-parallel-size: {in_features} input features do not split "
                             f"into {n} equal parts")
        super().__init__(in_features // n, out_features, bias)
        self.tp, self._start = n, tp_rank() * (in_features // n)

    def load_shard(self, shard: int, param: str, tensor):
        if param == "weight":
            t = tensor[:, self._start:self._start + self.in_features]
            tensor = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
        else:
            tensor = (tensor if isinstance(tensor, torch.Tensor) else torch.as_tensor(tensor[:])) / self.tp
        super().load_shard(shard, param, tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.tp == 1:
            return y
        from pagoda.distributed.parallel_state import all_reduce
        return all_reduce(y)
