"""Linear layers. Merged projections (q|k|v, gate|up) load their shards from the checkpoint's
separate tensors.

Weight formats (`quantize(method)`, after loading), each cutting the bytes a decode step reads,
which is what a decode step on the CPU is bound by:
- a GGUF's own blocks (Q4_0 ... Q6_K), kept packed on the CPU when the checkpoint tensors carry
  them (`tensor.gguf`, set by the GGUF loader) and multiplied with directly
  (layers/quantization/gguf.py); `int4` puts float weights in that format (Q4_1);
- int8 otherwise: on the CPU 8 bits in groups of 32 along K with a scale and minimum each and
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

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None):
        self.out_features = w.shape[0]
        self.bias = bias
        self.cpu = w.device.type == "cpu"
        if self.cpu:
            self.qweight, self.scales, self.mins = cpu_int8.quantize_weight(w)
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
        self._gguf = gguf_format.GGUFLinearMethod(self.shard_sizes, in_features)

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
        if param == "weight" and getattr(tensor, "gguf", None) is not None:
            self._gguf.load(shard, tensor.gguf)

    def quantize(self, method: str):
        """Put the loaded weight in the format of --quantization `method` (int8 | int4): the
        checkpoint's GGUF blocks when it has them, else int4 -> Q4_1 blocks, int8 -> int8."""
        bias = self.bias.data if self.bias is not None else None
        packed = gguf_format.pack(method, self.weight, self._gguf, gguf_format.Q4_1)
        self._gguf = None
        if packed is not None:
            self.gguf = packed.process(bias)
        elif int8_supported(self.weight):
            self.int8 = Int8Matmul(self.weight.data, bias)
        else:
            return  # stays float (logged once by the kernel loader)
        self.weight = None

    def drop_gguf(self):
        """Keep the float weight only (--quantization none)."""
        self._gguf = None
        if self.weight is not None and getattr(self.weight, "gguf", None) is not None:
            self.weight.gguf = None

    def quantize_int8(self):  # the name engines before quantize_model() call
        self.quantize("int8")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gguf is not None:
            return self.gguf(x)
        if self.int8 is not None:
            return self.int8(x)
        return F.linear(x, self.weight, self.bias)
