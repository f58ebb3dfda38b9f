"""Packed GGUF weights on the CPU (pagoda/kernels/cpu_gguf.c, layers/quantization/gguf.py): the
kernel against gguf.quants.dequantize on random blocks of every type it takes, for each
instruction set this machine runs; the packed model path against transformers and the float path;
--quantization int4; --threads."""
import numpy as np
import pytest
import torch

from conftest import assert_same_outputs, build_tiny, build_tiny_gguf, random_blocks, random_prompts
from pagoda.kernels import cpu_build, cpu_gguf

ISAS = cpu_build.supported_isas()
pytestmark = pytest.mark.skipif(not ISAS or not cpu_gguf.available(),
                                reason="needs x86 AVX2 and a C compiler")

NAMES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


def _k_for(t: int) -> int:
    return 512 if cpu_gguf.BLOCKS[t][0] == 256 else 96  # 3 blocks of 32: odd chunk counts too


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ggml_type", sorted(NAMES), ids=lambda t: NAMES[t])
def test_dequantize_equals_gguf_reference(isa, ggml_type):
    k = _k_for(ggml_type)
    blocks = random_blocks(ggml_type, 37, k, seed=ggml_type)
    ref = cpu_gguf.dequantize_torch(blocks, ggml_type)
    assert ref.shape == (37, k) and torch.isfinite(ref).all()
    torch.testing.assert_close(cpu_gguf.dequantize(blocks, ggml_type, isa), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ggml_type", sorted(NAMES), ids=lambda t: NAMES[t])
@pytest.mark.parametrize("M", [1, 2, 3, 7, 64, 200])
def test_gemm_matches_reference(isa, ggml_type, M):
    """N = 37 (odd, not a multiple of the register tile); M from one decode token to a prefill
    chunk longer than the kernel's token chunk (64)."""
    k = _k_for(ggml_type)
    g = torch.Generator().manual_seed(M)
    blocks = random_blocks(ggml_type, 37, k, seed=ggml_type + M)
    x = torch.randn(M, k, generator=g)
    bias = torch.randn(37, generator=g)
    parts = [cpu_gguf.Part(blocks, ggml_type)]
    out = cpu_gguf.gguf_matmul(x, cpu_gguf.make_parts(parts), k, 37, bias, isa)
    ref = cpu_gguf.gguf_matmul_torch(x, parts, 37, bias)
    assert out.shape == (M, 37)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 5, 9])
def test_gemm_of_a_merged_projection_with_mixed_types(isa, M):
    """q | k | v of a Q4_K_M-style file: rows of different types, each part at its own columns."""
    k = 256
    shapes = [(12, 14), (5, 12), (5, 6), (3, 8)]  # (rows, type): Q6_K, Q4_K, Q8_0, Q8_0
    parts, col = [], 0
    for i, (n, t) in enumerate(shapes):
        parts.append(cpu_gguf.Part(random_blocks(t, n, k, seed=i), t, col))
        col += n
    x = torch.randn(M, k, generator=torch.Generator().manual_seed(7))
    out = cpu_gguf.gguf_matmul(x, cpu_gguf.make_parts(parts), k, col, None, isa)
    ref = cpu_gguf.gguf_matmul_torch(x, parts, col)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_unpermuting_packed_rows_equals_unpermuting_floats():
    """llama.cpp's q/k row interleave undone on whole rows of blocks (blocks run along K)."""
    from pagoda.worker.loader import unpermute_qk
    blocks = random_blocks(3, 24, 64)
    floats = cpu_gguf.dequantize_torch(blocks, 3)
    torch.testing.assert_close(cpu_gguf.dequantize_torch(unpermute_qk(blocks, 3), 3),
                               unpermute_qk(floats, 3), rtol=0, atol=0)


def test_int4_blocks_are_q4_1_of_the_gguf_package():
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize
    from pagoda.layers.quantization import gguf as gguf_format
    w = torch.randn(10, 64, generator=torch.Generator().manual_seed(3))
    b = gguf_format.quantize(w, gguf_format.Q4_1)
    assert b.type == 3 and b.shape == (10, 64) and b.data.shape == (10, 40)
    assert np.array_equal(b.data.numpy(), gguf_quantize(w.numpy(), GGMLQuantizationType.Q4_1))
    err = (b.dequantize() - w).abs().max() / w.abs().max()
    assert 0 < err < 0.1  # 16 levels per group of 32


TINY_GGUF_TYPES = {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "Q4_0",
                   "ffn_gate": "Q4_1", "ffn_up": "Q4_1", "ffn_down": "Q8_0", "token_embd": "Q8_0",
                   "output": "Q4_1"}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_llama_dir):
    d = tmp_path_factory.mktemp("tiny-gguf")
    return build_tiny_gguf(tiny_llama_dir, str(d / "tiny-llama.gguf"), TINY_GGUF_TYPES)


def test_tiny_gguf_runs_packed_and_matches_transformers(tiny_gguf):
    """A llama GGUF whose merged qkv mixes Q4_0 | Q4_1 | Q8_0 rows: kept packed (q/k rows
    un-permuted), decode steps through the fused C layers, greedy tokens and top-5 logprobs as
    transformers' GGUF loader gives them (float32 dequantization)."""
    import os
    from transformers import AutoModelForCausalLM
    from pagoda import LLM
    from test_fidelity import check_against_hf
    llm = LLM(tiny_gguf, max_model_len=512, num_gpu_blocks_override=256)
    worker = llm.llm_engine.core.worker
    model = worker.model
    assert worker.quantization == "gguf"  # the default for a quantized GGUF on the CPU
    assert [p.type for p in model.layers[0].self_attn.qkv_proj.gguf.parts] == [2, 3, 8]
    assert [p.type for p in model.layers[1].mlp.gate_up_proj.gguf.parts] == [3]
    assert model.lm_head.gguf.parts[0].type == 3
    assert worker.runner.cpu_decoder is not None
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(tiny_gguf),
                                              gguf_file=os.path.basename(tiny_gguf),
                                              dtype=torch.float32).eval()
    check_against_hf(None, random_prompts(5, 3, 40, 49152, seed=3), hf_model=hf, llm=llm)


@pytest.fixture(scope="module")
def tiny_k_gguf(tmp_path_factory, smollm_side_dir):
    """A Q4_K_M-like tiny Llama: K-quant blocks (256 weights), v and down in Q6_K."""
    d = tmp_path_factory.mktemp("tiny-k-gguf")
    hf = build_tiny("llama", str(d / "hf"), smollm_side_dir, hidden_size=256, intermediate_size=512)
    types = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
             "ffn_gate": "Q5_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K", "token_embd": "Q8_0",
             "output": "Q6_K"}
    return build_tiny_gguf(hf, str(d / "tiny-k.gguf"), types)


def test_k_quant_gguf_runs_packed_and_matches_transformers(tiny_k_gguf):
    import os
    from transformers import AutoModelForCausalLM
    from pagoda import LLM
    from test_fidelity import check_against_hf
    llm = LLM(tiny_k_gguf, max_model_len=512, num_gpu_blocks_override=256)
    worker = llm.llm_engine.core.worker
    model = worker.model
    assert [p.type for p in model.layers[0].self_attn.qkv_proj.gguf.parts] == [12, 14]
    assert [p.type for p in model.layers[0].mlp.gate_up_proj.gguf.parts] == [13, 12]
    assert model.layers[0].mlp.down_proj.gguf.parts[0].type == 14
    assert worker.runner.cpu_decoder is not None
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(tiny_k_gguf),
                                              gguf_file=os.path.basename(tiny_k_gguf),
                                              dtype=torch.float32).eval()
    check_against_hf(None, random_prompts(4, 3, 40, 49152, seed=6), hf_model=hf, llm=llm)


def test_a_merged_projection_of_packed_and_float_shards_takes_the_floats(tmp_path, tiny_llama_dir):
    """q and v in blocks, k in F32: the loader kept q's and v's blocks and gave zeros for them, so
    qkv (which cannot be packed whole) must get their floats back before it falls back to int8
    groups; the layers that are all blocks stay packed, and no weight is left as zeros."""
    from pagoda import LLM
    from pagoda.kernels import cpu_int8
    path = build_tiny_gguf(tiny_llama_dir, str(tmp_path / "mixed.gguf"),
                           dict(TINY_GGUF_TYPES, attn_k=None))
    llm = LLM(path, max_model_len=256, num_gpu_blocks_override=64)
    model = llm.llm_engine.core.worker.model
    ref = LLM(path, quantization="none", max_model_len=256, num_gpu_blocks_override=64)
    ref_model = ref.llm_engine.core.worker.model
    for i, layer in enumerate(model.layers):
        qkv, ref_w = layer.self_attn.qkv_proj, ref_model.layers[i].self_attn.qkv_proj.weight
        assert qkv.gguf is None and qkv.int8 is not None
        w = cpu_int8.dequantize_weight(qkv.int8.qweight, qkv.int8.scales, qkv.int8.mins)
        q, k = qkv.shard_sizes[0], qkv.shard_sizes[1]
        for rows in (slice(0, q), slice(q, q + k), slice(q + k, None)):  # 8 bits a weight of each
            assert (w[rows] - ref_w[rows]).abs().max() < 1e-2 * ref_w[rows].abs().max()
        assert layer.mlp.gate_up_proj.gguf is not None and layer.self_attn.o_proj.gguf is not None


def _replace_by_dequantized(model):
    """The float path on the int4 weights: each Linear's weight becomes dequant(Q4_1(weight)),
    the head's dequant(Q8_0(head)), as --quantization int4 stores them (the embedding lookup
    stays float)."""
    from pagoda.layers.embedding import LMHead
    from pagoda.layers.linear import Linear
    from pagoda.layers.quantization import gguf as gguf_format
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Linear):
                m.weight.copy_(gguf_format.quantize(m.weight, gguf_format.Q4_1).dequantize())
            elif isinstance(m, LMHead):  # a tied embedding keeps its float table for lookups
                m.weight = torch.nn.Parameter(
                    gguf_format.quantize(m.weight, gguf_format.Q8_0).dequantize(), requires_grad=False)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen2"])
def test_int4_matches_the_float_path_on_its_weights(kind, request):
    """--quantization int4 on safetensors checkpoints (Qwen2's qkv bias, Qwen3's tied head):
    the packed kernels (fused decode layers included) give the tokens and logprobs of float
    matmuls with the same 4-bit weights."""
    from pagoda import LLM, SamplingParams
    path = request.getfixturevalue(f"tiny_{kind}_dir")
    prompts = [{"prompt_token_ids": p} for p in random_prompts(4, 3, 40, 49152, seed=5)]
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)
    packed = LLM(path, quantization="int4", max_model_len=512, num_gpu_blocks_override=256)
    worker = packed.llm_engine.core.worker
    assert worker.model.layers[0].mlp.down_proj.gguf.parts[0].type == 3
    assert worker.model.lm_head.gguf.parts[0].type == 8
    assert worker.runner.cpu_decoder is not None
    got = packed.generate(prompts, sp, use_tqdm=False)
    del packed
    ref_llm = LLM(path, quantization="none", max_model_len=512, num_gpu_blocks_override=256)
    _replace_by_dequantized(ref_llm.llm_engine.core.worker.model)
    assert_same_outputs(got, ref_llm.generate(prompts, sp, use_tqdm=False))


def test_packed_gguf_is_refused_on_cuda():
    """gguf blocks run on the CPU only; int4 on CUDA is W4A16 (layers/quantization/int4.py)."""
    from pagoda.config import EngineArgs
    with pytest.raises(ValueError, match=r"^--quantization: gguf runs on the CPU only"):
        EngineArgs(quantization="gguf", device="cuda")
    assert EngineArgs(quantization="int4", device="cuda").quantization == "int4"


def test_physical_cores_count_smt_siblings_once(monkeypatch):
    from pagoda.worker import threads as cpu
    siblings = {0: "0,4", 4: "0,4", 1: "1,5", 5: "1,5", 2: "2", 3: "3"}
    monkeypatch.setattr(cpu, "_allowed_cpus", lambda: {0, 1, 2, 4, 5})
    monkeypatch.setattr(cpu, "_core_of", lambda c: siblings[c])
    monkeypatch.setattr(cpu, "_cgroup_quota", lambda: None)
    assert cpu.physical_cores() == 3
    monkeypatch.setattr(cpu, "_cgroup_quota", lambda: 2)
    assert cpu.physical_cores() == 2
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu.default_threads() == (2, "physical cores")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu.default_threads() == (1, "OMP_NUM_THREADS")
    monkeypatch.setattr(cpu_build, "set_threads", lambda n: None)
    assert cpu.set_threads(None, ranks_here=2) == 1 and cpu.set_threads(3, ranks_here=2) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu.set_threads(None, ranks_here=2) == 1  # 2 cores over two tensor-parallel ranks
    monkeypatch.setattr(cpu, "_cgroup_quota", lambda: None)
    assert cpu.set_threads(None) == 3 and cpu.set_threads(None, ranks_here=3) == 1


def test_threads_reach_torch_and_the_kernels_on_any_thread():
    """--threads is applied to torch and to every loaded C library; a kernel called from a thread
    that never set OpenMP's count still uses it."""
    import ctypes
    import threading
    from pagoda.config import EngineArgs
    from pagoda.worker import threads as cpu
    with pytest.raises(ValueError, match=r"^--threads: must be >= 1"):
        EngineArgs(threads=0)
    lib = cpu_build.load("cpu_gguf", {})
    lib.pagoda_threads_in_region.restype = ctypes.c_int
    before = torch.get_num_threads()
    try:
        assert cpu.set_threads(1) == 1
        assert torch.get_num_threads() == 1
        seen = []
        t = threading.Thread(target=lambda: seen.append(lib.pagoda_threads_in_region()))
        t.start()
        t.join()
        assert seen == [1]
    finally:
        cpu.set_threads(before)
