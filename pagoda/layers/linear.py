"""Linear layers. Merged projections (q|k|v, gate|up) load their shards from the checkpoint's
separate tensors; with --quantization int8 the weight is stored as int8 per output channel and
multiplied through torch's int8 weight-only kernel (4x fewer weight bytes per decode step)."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 shard_sizes: list[int] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        # output rows of each shard of a merged projection, in order
        self.shard_sizes = shard_sizes or [out_features]
        self.qweight: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None

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

    def quantize_int8(self):
        """Symmetric per-output-channel int8 weights (weight-only; activations stay float)."""
        w = self.weight.data.float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.qweight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scales = scales.to(self.weight.dtype)
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            shape = x.shape
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.qweight, self.scales)
            y = y.reshape(*shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.weight, self.bias)
