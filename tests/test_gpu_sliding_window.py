"""Sliding-window attention on the GPU (run on a CUDA machine; skipped elsewhere): the compiled
Triton kernel against the torch reference with windows below, at and beyond the sequence
lengths, with blocks outside every window pointing at NaN; then tiny Gemma 3 and Mistral
through the Triton backend (eager and CUDA graphs, chunked prefill, prefix hits) give the
torch backend's greedy tokens in fp32."""
from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WINDOW = 24


def _batch(q_lens, seq_lens, heads, kv_heads, d, dtype, page, window, g):
    """q and a scattered paged cache; the blocks wholly before every query's window point at a
    NaN block, as a KV manager that frees them may leave the table."""
    blocks = [(s + page - 1) // page for s in seq_lens]
    nb = sum(blocks) + 1
    kv = torch.randn(2, nb, page, kv_heads, d, generator=g).to(dtype)
    kv[:, -1] = float("nan")
    perm = torch.randperm(nb - 1, generator=g)
    bt = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    used = 0
    for r, n in enumerate(blocks):
        bt[r, :n] = perm[used:used + n]
        used += n
    full_bt = bt.clone()
    for r, (ql, n) in enumerate(zip(q_lens, seq_lens)):
        bt[r, :max(0, n - ql - window + 1) // page] = nb - 1
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), heads, d, generator=g).to(dtype)
    return q, kv, qsl, torch.tensor(seq_lens, dtype=torch.int32), bt, full_bt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 7, 64, 200, 5000])
@pytest.mark.parametrize("cap", [None, 10.0])
def test_triton_sliding_window_matches_reference(dtype, window, cap):
    from pagoda.kernels.attention import paged_attention_torch
    from pagoda.kernels.attention_triton import paged_attention_triton
    g = torch.Generator().manual_seed(window)
    q_lens = [1, 1, 1, 1, 300, 17, 64, 1, 129, 5]
    seq_lens = [1, 64, 65, 1000, 300, 1017, 200, 4000, 700, 2048]
    q, kv, qsl, sl, bt, full_bt = _batch(q_lens, seq_lens, 16, 4, 128, dtype, 16, window, g)
    ref = paged_attention_torch(q.double(), kv.double(), qsl, sl, full_bt, 0.09,
                                sliding_window=window, logits_soft_cap=cap)
    dev = [t.cuda() for t in (q, kv, qsl, sl, bt)]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for hint in (None, max(q_lens)):
        out = paged_attention_triton(*dev, 0.09, max_query_len=hint, sliding_window=window,
                                     logits_soft_cap=cap).cpu().double()
        assert not out.isnan().any()
        assert ((out - ref).norm() / ref.norm()).item() < tol
    dec = [i for i, n in enumerate(q_lens) if n == 1]
    qd = q[qsl[torch.tensor(dec)].long()].contiguous()
    qsl_d = torch.arange(len(dec) + 1, dtype=torch.int32)
    ref_d = paged_attention_torch(qd.double(), kv.double(), qsl_d, sl[dec], full_bt[dec], 0.09,
                                  sliding_window=window, logits_soft_cap=cap)
    for splits in (None, 1, 7):
        out = paged_attention_triton(qd.cuda(), kv.cuda(), qsl_d.cuda(), sl[dec].cuda(),
                                     bt[dec].cuda(), 0.09, max_query_len=1, num_splits=splits,
                                     sliding_window=window, logits_soft_cap=cap).cpu().double()
        assert not out.isnan().any()
        assert ((out - ref_d).norm() / ref_d.norm()).item() < tol, splits


def _build(kind, path):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig
    common = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                  sliding_window=WINDOW, eos_token_id=None)
    if kind == "gemma3":
        cfg = Gemma3TextConfig(**common, num_hidden_layers=4, sliding_window_pattern=2,
                               query_pre_attn_scalar=48, final_logit_softcapping=30.0,
                               rope_scaling={"rope_type": "linear", "factor": 2.0})
    else:
        cfg = MistralConfig(**common, num_hidden_layers=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_((0.0 if kind == "gemma3" else 1.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    m.save_pretrained(path)
    return path


def _prompts():
    rng = random.Random(0)
    shared = [rng.randrange(4096) for _ in range(5 * WINDOW)]
    out = [[rng.randrange(4096) for _ in range(rng.choice([1, 15, 23, 24, 25, 100, 300]))]
           for _ in range(10)]
    return out + [shared + [7, 8], shared + [9]]  # a prefix-cache hit over several windows


def _tokens(model_dir, backend, eager=True, **kw):
    from pagoda import LLM, SamplingParams
    llm = LLM(model_dir, device="cuda", attention_backend=backend, dtype="float32",
              enforce_eager=eager, skip_tokenizer_init=True, max_model_len=1024,
              num_gpu_blocks_override=400, **kw)
    outs = llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kind", ["gemma3", "mistral"])
def test_triton_backend_matches_torch_with_sliding_windows(kind, tmp_path):
    model_dir = _build(kind, str(tmp_path / kind))
    ref = _tokens(model_dir, "torch")
    assert _tokens(model_dir, "triton", eager=True) == ref
    assert _tokens(model_dir, "triton", eager=False) == ref
    assert _tokens(model_dir, "triton", eager=False, max_num_batched_tokens=40) == ref
