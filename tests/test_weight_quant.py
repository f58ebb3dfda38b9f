"""Weight formats (--quantization fp8 | int4 | awq | gptq): the W4A16 Triton GEMM against its torch
reference (TRITON_INTERPRET=1), round-to-nearest int4, the fp8 linear against the quantized
product it stands for, AWQ and GPTQ checkpoints packed here into the published layouts (by
packers written from the formats' descriptions, not from pagoda's unpackers) and run by pagoda
against transformers on the dequantized weights, and the flag's errors."""
from __future__ import annotations

import json
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (as in test_kernels.py)

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import random_prompts  # noqa: E402
from pagoda import LLM  # noqa: E402
from pagoda.kernels import w4a16  # noqa: E402
from pagoda.kernels.fp8_linear import fp8_linear_torch, quantize_rows  # noqa: E402
from pagoda.layers.quantization import awq, gptq, int4  # noqa: E402


def _random_groups(k, n, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=g).to(torch.uint8)
    scales = torch.rand(k // group, n, generator=g) * 0.02 + 0.001
    zeros = torch.randint(0, 16, (k // group, n), generator=g).float()
    return codes, scales, zeros


# -- W4A16 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,n,k,group,split", [(1, 72, 256, 128, None), (3, 64, 128, 32, 2),
                                               (17, 40, 192, 64, 1), (70, 136, 128, 128, 1),
                                               (5, 8, 64, 64, 3)])
def test_w4a16_triton_matches_reference(m, n, k, group, split):
    codes, scales, zeros = _random_groups(k, n, group)
    qw = w4a16.pack_codes(codes)
    assert torch.equal(w4a16.unpack_codes(qw), codes)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    ref = w4a16.w4a16_matmul_torch(x, qw, scales, zeros, group, bias)
    # the reference is x @ ((code - zero) * scale) with the group of row k = k // group
    w = (codes.float() - zeros.repeat_interleave(group, 0)) * scales.repeat_interleave(group, 0)
    assert torch.allclose(ref, x @ w + bias, atol=1e-5)
    got = w4a16.w4a16_matmul_triton(x, qw, scales, zeros, group, bias, split_k=split)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4), (got - ref).abs().max()


def test_rtn_int4_round_trip():
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    w[3, :128] = 0.0  # an all-zero group stays exactly zero
    codes, scales, zeros = int4.rtn(w)
    assert codes.shape == (256, 48) and scales.shape == (2, 48) and int(codes.max()) <= 15
    layer = int4.Int4LinearMethod(codes, scales, zeros, 128, None, torch.float32)
    back = layer.dequantize()
    step = scales.repeat_interleave(128, 0).T
    assert ((back - w).abs() <= step * 0.5 + 1e-6).all()
    assert torch.equal(back[3, :128], torch.zeros(128))
    x = torch.randn(5, 256)
    assert torch.allclose(layer(x), x @ back.T, atol=1e-4)


# -- fp8 -----------------------------------------------------------------------------------------

def test_fp8_linear_is_the_quantized_product():
    torch.manual_seed(0)
    x, w, b = torch.randn(9, 96) * 3, torch.randn(40, 96) * 0.05, torch.randn(40)
    wq, ws = quantize_rows(w)
    assert wq.dtype == torch.float8_e4m3fn and ws.shape == (40, 1)
    assert torch.allclose(wq.float().abs().amax(1), torch.full((40,), 448.0))  # each row fills the range
    got = fp8_linear_torch(x, wq, ws, b)
    xq, xs = quantize_rows(x)
    exact = (xq.double() * xs.double()) @ (wq.double() * ws.double()).T + b.double()
    assert torch.allclose(got.double(), exact, atol=1e-4)
    # and near the float product: e4m3 keeps 3 mantissa bits (relative error <= 1/16 a value)
    rel = (got - (x @ w.T + b)).norm() / (x @ w.T + b).norm()
    assert 0 < rel < 0.05


# -- AWQ / GPTQ layouts ----------------------------------------------------------------------------

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i holds column 8c + order[i]


def pack_awq_columns(codes: torch.Tensor) -> torch.Tensor:
    """[R, 8C] codes -> int32 [R, C], AutoAWQ's GEMM packing."""
    r, n = codes.shape
    out = torch.zeros(r, n // 8, dtype=torch.int64)
    for c in range(n // 8):
        for i in range(8):
            out[:, c] |= codes[:, 8 * c + AWQ_PACK_ORDER[i]].long() << (4 * i)
    return out.to(torch.int32)  # wraps the top bit as the int32 checkpoint does


def pack_gptq(codes, zeros, v2):
    """codes [K, N] -> qweight int32 [K / 8, N] (row 8r + i in bits 4i); zeros [G, N] ->
    qzeros int32 [G, N / 8] (column 8c + i in bits 4i), stored as zero - 1 in v1."""
    k, n = codes.shape
    qw = torch.zeros(k // 8, n, dtype=torch.int64)
    for i in range(8):
        qw |= codes[i::8].long() << (4 * i)
    z = zeros.long() if v2 else (zeros.long() - 1) & 15
    qz = torch.zeros(z.shape[0], n // 8, dtype=torch.int64)
    for i in range(8):
        qz |= z[:, i::8] << (4 * i)
    return qw.to(torch.int32), qz.to(torch.int32)


def test_awq_unpack_reads_the_published_layout():
    codes, scales, zeros = _random_groups(64, 32, 32, seed=1)
    c, z, s = awq.unpack(pack_awq_columns(codes), pack_awq_columns(zeros.to(torch.uint8)), scales)
    assert torch.equal(c, codes) and torch.equal(z, zeros) and s is scales
    # nibbles in bit order are columns 0, 4, 1, 5, 2, 6, 3, 7 (the description)
    word = int(pack_awq_columns(torch.arange(8, dtype=torch.uint8)[None])[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 15 for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("v2", [False, True])
def test_gptq_unpack_with_act_order(v2):
    k, n, group = 64, 16, 16
    codes, scales, zeros = _random_groups(k, n, group, seed=2)
    zeros[0, 0] = 0  # v1 stores it as 15 (zero - 1 in four bits)
    g_idx = torch.randperm(k, generator=torch.Generator().manual_seed(3)) % (k // group)
    qw, qz = pack_gptq(codes, zeros, v2)
    c, z, s, g = gptq.unpack(qw, qz, scales, g_idx.to(torch.int32), group, v2)
    assert torch.equal(c, codes) and torch.equal(z, zeros) and torch.equal(g, g_idx.to(torch.int32))
    layer = int4.from_groups(c, s, z, g, group, None, torch.float32)
    assert layer.perm is not None
    want = ((codes.float() - zeros[g_idx]) * scales[g_idx]).T  # W[n, k]
    assert torch.allclose(layer.dequantize(), want, atol=1e-6)
    x = torch.randn(3, k)
    assert torch.allclose(layer(x), x @ want.T, atol=1e-4)


# -- checkpoints against transformers ------------------------------------------------------------

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantized_checkpoint(src: str, out: str, ref: str, method: str, group: int, v2=False,
                          act_order=False):
    """From the tiny float checkpoint `src`: an AWQ / GPTQ checkpoint in `out` (every decoder
    linear RTN-quantized and packed; lm_head kept float as modules_to_not_convert) and the float
    checkpoint of its dequantized weights in `ref`."""
    from safetensors.torch import load_file, save_file
    import shutil
    sd = load_file(os.path.join(src, "model.safetensors"))
    q_sd, ref_sd = {}, {}
    gen = torch.Generator().manual_seed(5)
    for name, t in sd.items():
        mod = name.rsplit(".", 2)
        if len(mod) == 3 and mod[1] in LINEARS and mod[2] == "weight":
            base = name[: -len(".weight")]
            n, k = t.shape
            codes, scales, zeros = int4.rtn(t, group)
            scales = scales.half()
            g_idx = torch.arange(k) // group
            if act_order:  # GPTQ desc_act: rows of one group scattered over K
                g_idx = torch.randperm(k, generator=gen) % (k // group)
                w = t.float()
                scales = torch.zeros(k // group, n)
                zeros = torch.zeros(k // group, n)
                codes = torch.zeros(k, n, dtype=torch.uint8)
                for gi in range(k // group):
                    cols = (g_idx == gi).nonzero().flatten()
                    c, s_, z_ = int4.rtn(w[:, cols], group)
                    codes[cols], scales[gi], zeros[gi] = c, s_[0], z_[0]
                scales = scales.half()
            deq = ((codes.float() - zeros[g_idx]) * scales.float()[g_idx]).T.contiguous()
            ref_sd[name] = deq
            if method == "awq":
                q_sd[base + ".qweight"] = pack_awq_columns(codes)
                q_sd[base + ".qzeros"] = pack_awq_columns(zeros.to(torch.uint8))
                q_sd[base + ".scales"] = scales
            else:
                qw, qz = pack_gptq(codes, zeros, v2)
                q_sd[base + ".qweight"], q_sd[base + ".qzeros"] = qw, qz
                q_sd[base + ".scales"] = scales
                q_sd[base + ".g_idx"] = g_idx.to(torch.int32)
        else:
            q_sd[name] = ref_sd[name] = t
    for d, tensors in ((out, q_sd), (ref, ref_sd)):
        shutil.copytree(src, d, dirs_exist_ok=True)
        save_file(tensors, os.path.join(d, "model.safetensors"))
    cfg_path = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_path))
    if method == "awq":
        cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group,
                                      "zero_point": True, "version": "gemm",
                                      "modules_to_not_convert": ["lm_head"]}
    else:
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group,
                                      "desc_act": act_order, "sym": False,
                                      "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    json.dump(cfg, open(cfg_path, "w"))
    return out, ref


@pytest.mark.parametrize("method,group,v2,act_order", [("awq", 32, False, False),
                                                       ("gptq", 64, False, True),
                                                       ("gptq", 32, True, False)])
def test_checkpoint_matches_transformers_on_dequantized_weights(tiny_llama_dir, tmp_path, method,
                                                                group, v2, act_order):
    from test_fidelity import check_against_hf
    out, ref = _quantized_checkpoint(tiny_llama_dir, str(tmp_path / "q"), str(tmp_path / "ref"),
                                     method, group, v2, act_order)
    llm = LLM(out, max_model_len=512, num_gpu_blocks_override=128)
    worker = llm.llm_engine.core.worker
    assert worker.quantization == method
    check_against_hf(ref, random_prompts(4, 3, 40, 49152, seed=4), llm=llm, n_new=8, atol=1e-3)


def test_flag_errors_name_the_format(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="--quantization: awq needs an AWQ checkpoint"):
        LLM(tiny_llama_dir, quantization="awq", max_model_len=256)
    with pytest.raises(ValueError, match="--quantization: gguf needs a .gguf model"):
        LLM(tiny_llama_dir, quantization="gguf", max_model_len=256, device="cpu")
    out, _ = _quantized_checkpoint(tiny_llama_dir, str(tmp_path / "q"), str(tmp_path / "r"), "awq", 32)
    with pytest.raises(ValueError, match="checkpoint is AWQ; pass --quantization awq"):
        LLM(out, quantization="fp8", max_model_len=256)
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(ValueError, match="quantized as 'bitsandbytes'"):
        LLM(out, max_model_len=256)
    with pytest.raises(ValueError, match="--quantization"):
        LLM(tiny_llama_dir, quantization="nf4", max_model_len=256)


def test_fp8_online_on_cpu_stays_close():
    """--quantization fp8 on the CPU (the float32 reference of the fp8 product) on the bundled
    model: every decoder linear holds fp8 weights, and greedy tokens stay those of the float
    weights or part where the float model's top two are within 0.25 nats (e4m3 keeps 3 mantissa
    bits, weights and activations both: on this 135M model logprobs move by up to ~0.2)."""
    from pagoda import SamplingParams
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at",
               "The three laws of robotics are"]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    base = LLM(quantization="none", max_model_len=256, num_gpu_blocks_override=64)
    q = LLM(quantization="fp8", max_model_len=256, num_gpu_blocks_override=64)
    layer = q.llm_engine.core.worker.model.layers[0].self_attn.qkv_proj
    assert layer.weight is None and layer.quant.qweight.dtype == torch.float8_e4m3fn
    a = base.generate(prompts, sp, use_tqdm=False)
    b = q.generate(prompts, sp, use_tqdm=False)
    same = 0
    for x, y in zip(a, b):
        tx, ty = x.outputs[0].token_ids, y.outputs[0].token_ids
        i = next((i for i, (u, w) in enumerate(zip(tx, ty)) if u != w), None)
        if i is None:
            same += 1
            continue
        top2 = sorted(lp.logprob for lp in x.outputs[0].logprobs[i].values())[-2:]
        assert top2[1] - top2[0] < 0.25, (i, tx, ty)
    assert same >= 2


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
def test_fp8_checkpoint_equals_online_fp8_of_its_dequantized_weights(tiny_llama_dir, tmp_path, scheme):
    """An FP8 checkpoint (float8_e4m3 weights with weight_scale per tensor / per channel, or
    weight_scale_inv per 32x32 block) runs exactly as `-q fp8` on a float checkpoint holding its
    dequantized weights: both requantize the same floats per channel."""
    import shutil
    from safetensors.torch import load_file, save_file
    from pagoda import SamplingParams
    sd = load_file(os.path.join(tiny_llama_dir, "model.safetensors"))
    q_sd, ref_sd = {}, {}
    for name, t in sd.items():
        parts = name.rsplit(".", 2)
        if len(parts) == 3 and parts[1] in LINEARS and parts[2] == "weight":
            base = name[: -len(".weight")]
            n, k = t.shape
            if scheme == "block":
                s = t.reshape(n // 32, 32, k // 32, 32).abs().amax((1, 3)) / 448
                full = s.repeat_interleave(32, 0).repeat_interleave(32, 1)
                q_sd[base + ".weight_scale_inv"] = s
            else:
                s = (t.abs().amax(1, keepdim=True) if scheme == "channel" else t.abs().amax()) / 448
                full = s
                q_sd[base + ".weight_scale"] = s.reshape(-1) if scheme == "channel" else s.reshape(())
            q = (t / full).to(torch.float8_e4m3fn)
            q_sd[name] = q
            q_sd[base + ".input_scale"] = torch.tensor(1.0)  # static activation scales: unused
            ref_sd[name] = q.float() * full
        else:
            q_sd[name] = ref_sd[name] = t
    out, ref = str(tmp_path / "fp8"), str(tmp_path / "ref")
    for d, tensors in ((out, q_sd), (ref, ref_sd)):
        shutil.copytree(tiny_llama_dir, d, dirs_exist_ok=True)
        save_file(tensors, os.path.join(d, "model.safetensors"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static",
                                  **({"weight_block_size": [32, 32]} if scheme == "block" else {})}
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    prompts = random_prompts(3, 5, 30, 49152, seed=8)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    a = LLM(out, max_model_len=256, num_gpu_blocks_override=64)
    assert a.llm_engine.core.worker.quantization == "fp8"
    b = LLM(ref, max_model_len=256, num_gpu_blocks_override=64, quantization="fp8")
    for x, y in zip(a.generate(prompts, sp, use_tqdm=False), b.generate(prompts, sp, use_tqdm=False)):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            for tid, lp in lx.items():
                assert abs(lp.logprob - ly[tid].logprob) < 1e-5
