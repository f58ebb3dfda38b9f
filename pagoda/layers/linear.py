"""Linear layers. Merged projections (q|k|v, gate|up) load their shards from the checkpoint's
separate tensors.

Weight formats (after loading; pagoda/worker/loader.py and worker.py pick), each cutting the
bytes a step reads, which is what a decode step is bound by:
- --quantization gguf: a GGUF's own blocks (Q4_0 ... Q6_K), kept packed on the CPU and multiplied
  with directly (layers/quantization/gguf.py); `int4` on the CPU puts float weights in that
  format (Q4_1);
- int8: on the CPU 8 bits in groups of 32 along K with a scale and minimum each and
  float32 activations, through our AVX2 kernel (pagoda/kernels/cpu_int8.c). fbgemm's dynamic int8
  is about as fast but scales activations per tensor, and greedy outputs then diverged from
  float32 at the first token on most C1 prompts; on CUDA, per output channel and weight-only
  (torch's int8 weight-only kernel);
- the formats of layers/quantization/ that are a layer's `quant` (`quantize(method)` after
  loading, then `quant(x)`): fp8 (per channel, dynamic per-token activations), int4 on CUDA
  (W4A16, groups of 128) and AWQ / GPTQ checkpoints, whose packed tensors (qweight, qzeros,
  scales, g_idx) are kept per shard while loading (`checkpoint_quant` set by the worker) and
  unpacked into the same W4A16 format; FP8 checkpoints' scales likewise.
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


# the tensors of a quantized checkpoint's layer besides (or instead of) its weight: AWQ / GPTQ,
# and FP8's scales (per tensor / channel, or per 2-D block)
PACKED_PARAMS = ("qweight", "qzeros", "scales", "g_idx", "weight_scale", "weight_scale_inv",
                 "input_scale")

_HELD = torch.zeros(())


def held_weight(shape) -> torch.Tensor:
    """What a loader yields for a matrix it keeps in a packed form (a GGUF's blocks, int8 groups)
    and hands to the layer after loading: a broadcast zero of its shape. Linear and LMHead do not
    copy it into their float weight (which the packed form replaces; loader.quantize_weights puts
    the floats back where a layer cannot take it): touching the float weights of every packed
    matrix cost a warm start ~0.3 s."""
    return _HELD.expand(shape)


def is_held(tensor) -> bool:
    return (isinstance(tensor, torch.Tensor) and tensor.dim() > 0 and not any(tensor.stride())
            and tensor.data_ptr() == _HELD.data_ptr())


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
        self.quant = None             # a layers/quantization method: called instead of F.linear
        self.checkpoint_quant = None  # quantization.checkpoint.CheckpointQuant of an AWQ/GPTQ model
        self._packed: dict[int, dict[str, torch.Tensor]] = {}
        self.gguf: gguf_format.GGUFLinearMethod | None = None  # packed GGUF blocks (CPU)

    def load_full(self, param: str, tensor: torch.Tensor):
        """A checkpoint tensor for the whole (unmerged) layer."""
        self.load_shard(0, param, tensor)

    def load_shard(self, shard: int, param: str, tensor: torch.Tensor):
        if param in PACKED_PARAMS:
            return self._load_packed(shard, param, tensor)
        start = sum(self.shard_sizes[:shard])
        size = self.shard_sizes[shard]
        target = self.weight if param == "weight" else self.bias
        if target is None:
            raise ValueError(f"checkpoint has a {param} the model does not expect")
        if tensor.shape[0] != size or (param == "weight" and tensor.shape[1] != self.in_features):
            raise ValueError(f"shape mismatch: checkpoint {tuple(tensor.shape)} vs shard {shard} of "
                             f"{tuple(target.shape)}")
        if not is_held(tensor):
            target.data[start:start + size].copy_(tensor)

    def quantize_int8(self, groups=None):
        """int8 weights; `groups`: the CPU format (q, scale, min) already at hand, e.g. read from
        a GGUF's blocks."""
        if not int8_supported(self.weight):
            return  # stays float (logged once by the kernel loader)
        self.int8 = Int8Matmul(self.weight.data, self.bias.data if self.bias is not None else None, groups)
        self.weight = None

    def _load_packed(self, shard: int, param: str, tensor) -> None:
        if self.checkpoint_quant is None:
            raise ValueError(f"checkpoint has a {param} (a quantized layer) but its config names no "
                             "AWQ/GPTQ/FP8 quantization")
        self._packed.setdefault(shard, {})[param] = (tensor if isinstance(tensor, torch.Tensor)
                                                     else torch.as_tensor(tensor[:]))

    def quantize(self, method: str) -> None:
        """Put the loaded weight in --quantization `method`'s format: fp8 | int4 online, or the
        AWQ / GPTQ shards kept while loading (on the CPU: dequantized once into the float
        weight, which the matmul then reads)."""
        from pagoda.layers.quantization import fp8, int4
        bias = self.bias.data if self.bias is not None else None
        if self._packed and self.checkpoint_quant.method == "fp8":
            self._dequantize_fp8_shards()
        if self._packed:
            codes, scales, zeros, g_idx = self._unpack_shards()
            if self.weight.device.type != "cuda":
                self.weight.data.copy_(int4.from_groups(codes, scales, zeros, g_idx, self._group(),
                                                        None, self.weight.dtype).dequantize())
                return
            self.quant = int4.from_groups(codes, scales, zeros, g_idx, self._group(), bias,
                                          self.weight.dtype)
        elif method == "fp8":
            self.quant = fp8.Fp8LinearMethod(self.weight.data, bias)
        elif method == "int4":
            if self.in_features % int4.GROUP:
                return  # stays float: no whole groups of 128
            codes, scales, zeros = int4.rtn(self.weight.data)
            self.quant = int4.Int4LinearMethod(codes, scales, zeros, int4.GROUP, bias, self.weight.dtype)
        else:
            return
        self.weight = None

    def _dequantize_fp8_shards(self) -> None:
        """An FP8 checkpoint's shards: their fp8 values (loaded into the float weight) times their
        scales, so that fp8.Fp8LinearMethod quantizes the merged rows per channel again (the
        checkpoint's activation scales are not used: activations are scaled per token)."""
        from pagoda.layers.quantization.fp8 import checkpoint_scales
        start = 0
        for shard, size in enumerate(self.shard_sizes):
            t = self._packed.get(shard, {})
            rows = self.weight.data[start:start + size]
            rows.copy_(rows.float() * checkpoint_scales(t, rows.shape, self.checkpoint_quant.block))
            start += size
        self._packed = {}

    def _group(self) -> int:
        g = self.checkpoint_quant.group
        return self.in_features if g <= 0 else g

    def _unpack_shards(self):
        """The AWQ / GPTQ shards, unpacked and joined along N: codes [K, N], scales, zeros, g_idx."""
        from pagoda.layers.quantization import awq, gptq
        cq, parts = self.checkpoint_quant, []
        for shard in range(len(self.shard_sizes)):
            t = self._packed.get(shard, {})
            need = ("qweight", "qzeros", "scales")
            if any(n not in t for n in need):
                raise ValueError(f"--quantization {cq.method}: a layer's shard {shard} lacks "
                                 f"{[n for n in need if n not in t]}")
            if cq.method == "awq":
                parts.append((*awq.unpack(t["qweight"], t["qzeros"], t["scales"]), None))
            else:
                parts.append(gptq.unpack(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"),
                                         self._group(), cq.v2_zeros))
        self._packed = {}
        g_idx = parts[0][3]
        if any(p[3] is not None and not torch.equal(p[3], g_idx) for p in parts[1:]):
            raise ValueError("--quantization gptq: merged projections with different g_idx")
        codes, zeros, scales = (torch.cat([p[i] for p in parts], 1) for i in range(3))
        if tuple(codes.shape) != (self.in_features, self.out_features):
            raise ValueError(f"--quantization {cq.method}: packed weight unpacks to "
                             f"{tuple(codes.shape)}, the layer is ({self.in_features}, {self.out_features})")
        return codes, scales, zeros, g_idx

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
        if self.quant is not None:
            return self.quant(x)
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
        if param in PACKED_PARAMS:  # one rank only (quantized formats refuse tensor parallelism)
            return super().load_shard(shard, param, tensor)
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
        if param in PACKED_PARAMS:
            return super().load_shard(shard, param, tensor)
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
