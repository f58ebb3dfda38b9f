"""Decode steps of a Llama-family model on the CPU through one C call per layer
(pagoda/kernels/cpu_decoder.c): the CPU's decode accelerator, as CUDA graphs are the GPU's. The
model runner uses it when every projection holds packed GGUF blocks (--quantization gguf, the
default for a quantized GGUF on the CPU; int4) or 8-bit group weights (int8), over a float32 or
an int8 KV cache (--kv-cache-dtype int8 / --quant-policy 8). Prefill and mixed steps, other
dtypes, cache formats and devices keep the model's per-op forward, which is also this path's
reference (tests/test_cpu_kernels.py)."""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from pagoda.kernels import cpu_build
from pagoda.layers.attention import AttentionMetadata

_P, _I64, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _QWeight(ctypes.Structure):
    _fields_ = [("q", _P), ("scale", _P), ("min", _P), ("bias", _P), ("n", _I64), ("k", _I64),
                ("parts", _P), ("nparts", _I64)]


class _Layer(ctypes.Structure):
    _fields_ = [("hidden", _I64), ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64),
                ("inter", _I64), ("rot", _I64), ("eps", _F), ("attn_scale", _F),
                ("ln1", _P), ("ln2", _P), ("q_norm", _P), ("k_norm", _P),
                ("qkv", _QWeight), ("o", _QWeight), ("gate_up", _QWeight), ("down", _QWeight),
                ("kv", _P), ("kv_scales", _P), ("kv_zeros", _P), ("num_blocks", _I64),
                ("block_size", _I64), ("window", _I64)]


class _Step(ctypes.Structure):
    _fields_ = [("T", _I64), ("positions", _P), ("slots", _P), ("rows", _P), ("cos_sin", _P),
                ("block_tables", _P), ("seq_lens", _P), ("max_blocks", _I64),
                ("xn", _P), ("qkv", _P), ("attn", _P), ("gu", _P), ("act", _P)]


def _lib():
    return cpu_build.load("cpu_decoder", {"pagoda_decoder_layer": [_P, _P, _P, _P, ctypes.c_int]})


def _qweight(linear) -> Optional[_QWeight]:
    g = linear.gguf
    if g is not None:
        b = g.bias
        return _QWeight(None, None, None, b.data_ptr() if b is not None else None, g.n, g.k,
                        ctypes.addressof(g.c_parts), len(g.c_parts))
    m = linear.int8
    if m is None or not m.cpu:
        return None
    b = m.bias
    return _QWeight(m.qweight.data_ptr(), m.scales.data_ptr(), m.mins.data_ptr(),
                    b.data_ptr() if b is not None else None, m.qweight.shape[0], m.qweight.shape[1],
                    None, 0)


def _has_bias(linear) -> bool:
    return (linear.gguf or linear.int8).bias is not None


class CpuDecoder:
    """Built once the KV cache is bound (rebuild it if the cache moves); `None` from `build`
    means the model is not eligible."""

    def __init__(self, model, layers: list[_Layer]):
        self.model = model
        self.layers = layers
        self.kv_ptr = model.layers[0].self_attn.attn.kv_cache.data_ptr()

    @classmethod
    def build(cls, model) -> Optional["CpuDecoder"]:
        from pagoda.kernels.cpu_attention import reads
        from pagoda.layers.norm import RMSNorm
        from pagoda.models.llama import LlamaDecoderLayer
        from pagoda.distributed.parallel_state import tp_size
        if (_lib() is None or not hasattr(model, "layers") or not hasattr(model, "embed_tokens")
                or tp_size() > 1):  # its layers end without the ranks' all-reduce
            return None
        if type(model.norm) is not RMSNorm:
            return None
        out = []
        for layer in model.layers:
            # the C layer is LlamaDecoderLayer's forward exactly: SiLU MLP, two plain RMSNorms,
            # no soft cap; Gemma 3 (four (1 + w) norms, GELU) keeps the per-op path
            if not isinstance(layer, LlamaDecoderLayer) or layer.self_attn.attn.logits_soft_cap:
                return None
            at, mlp = layer.self_attn, layer.mlp
            cache, kvq = at.attn.kv_cache, at.attn.kv_quant
            ws = [_qweight(x) for x in (at.qkv_proj, at.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if (any(w is None for w in ws) or _has_bias(mlp.gate_up_proj)
                    or _has_bias(mlp.down_proj) or not reads(cache, kvq)
                    or cache.device.type != "cpu" or cache.numel() == 0
                    or at.num_heads // at.num_kv_heads > 64
                    or at.rotary.cos_sin_cache.dtype != torch.float32):
                return None
            qn = at.q_norm.weight.data_ptr() if at.qk_norm else None
            kn = at.k_norm.weight.data_ptr() if at.qk_norm else None
            out.append(_Layer(layer.input_layernorm.weight.shape[0], at.num_heads, at.num_kv_heads,
                              at.head_dim, mlp.down_proj.in_features, at.rotary.cos_sin_cache.shape[1],
                              layer.input_layernorm.eps, at.attn.scale,
                              layer.input_layernorm.weight.data_ptr(),
                              layer.post_attention_layernorm.weight.data_ptr(), qn, kn, *ws,
                              cache.data_ptr(), kvq.scales.data_ptr() if kvq else None,
                              kvq.zeros.data_ptr() if kvq else None, cache.shape[1], cache.shape[2],
                              at.attn.sliding_window or 0))
        return cls(model, out)

    def stale(self) -> bool:
        return self.model.layers[0].self_attn.attn.kv_cache.data_ptr() != self.kv_ptr

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 m: AttentionMetadata) -> torch.Tensor:
        """A decode-only step: token ids -> final hidden states (after the model's last norm)."""
        h = self.model.embed_tokens(input_ids)
        h, res = self._layers(h, positions, m)
        h, _ = self.model.norm(h, res)
        return h

    def _layers(self, h: torch.Tensor, positions: torch.Tensor, m: AttentionMetadata):
        T, H = h.shape
        L0 = self.layers[0]
        D, heads, kvh = L0.head_dim, L0.heads, L0.kv_heads
        pos = positions.to(torch.int64).contiguous()
        slots = m.slot_mapping.to(torch.int64).contiguous()
        bt = m.block_tables.to(torch.int32).contiguous()
        lens = m.seq_lens.to(torch.int32).contiguous()
        rows = torch.arange(T, dtype=torch.int64)
        scratch = [torch.empty(T, n) for n in (H, (heads + 2 * kvh) * D, heads * D,
                                               2 * L0.inter, L0.inter)]
        cos_sin = self.model.layers[0].self_attn.rotary.cos_sin_cache
        step = _Step(T, pos.data_ptr(), slots.data_ptr(), rows.data_ptr(), cos_sin.data_ptr(),
                     bt.data_ptr(), lens.data_ptr(), bt.shape[1], *(s.data_ptr() for s in scratch))
        h = h.contiguous()
        res = torch.empty_like(h)
        fn, sp = _lib().pagoda_decoder_layer, ctypes.byref(step)
        hp, rp = h.data_ptr(), res.data_ptr()
        for i, layer in enumerate(self.layers):
            fn(ctypes.byref(layer), sp, hp, rp, int(i == 0))
        return h, res
