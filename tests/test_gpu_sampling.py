"""The sampler's CUDA path (run on a CUDA machine; skipped elsewhere): the Triton row sampler and
penalties against their torch twins at the Qwen3 vocabulary, the sampled distribution against
the definition, and end to end on a small model: overlapped steps equal step-by-step for every
sampling setting, seeded requests equal alone and in a batch."""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from conftest import random_prompts
from test_sampler import CASES, LOGITS, V, assert_matches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_triton_row_sampler_and_penalties_equal_torch_twins_at_full_vocab():
    from pagoda.kernels import sampling, sampling_triton
    g = torch.Generator(device="cuda").manual_seed(0)
    b, vocab = 64, 151936
    logits = (torch.randn(b, vocab, device="cuda", generator=g) * 2).bfloat16()
    idx = torch.arange(b, device="cuda")
    width = torch.full((b,), vocab, device="cuda")
    inv_t = torch.full((b,), 1 / 0.8, device="cuda")
    min_p = torch.where(idx % 3 == 0, 0.05, 0.0).float()
    top_p = torch.where(idx % 2 == 0, 0.95, 1.0).float()
    seeds, pos = np.arange(b, dtype=np.uint64) * 7919 + 1, np.arange(b, dtype=np.int64)
    got = sampling_triton.sample_rows_triton(logits, idx, width, inv_t, min_p, top_p,
                                             torch.from_numpy(seeds.view(np.int64)).cuda(),
                                             torch.from_numpy(pos).cuda())
    ref = sampling.sample_rows_torch(logits.cpu(), idx.cpu(), width.cpu(), inv_t.cpu(), min_p.cpu(),
                                     top_p.cpu(), seeds, pos)
    assert (got.cpu() == ref).float().mean() >= 0.95
    state = torch.randint(0, 3, (b, vocab), device="cuda", generator=g, dtype=torch.int32)
    state |= (torch.rand(b, vocab, device="cuda", generator=g) < 0.01).int() * sampling.PROMPT_BIT
    rep, freq, pres = (torch.full((b,), v, device="cuda") for v in (1.1, 0.3, 0.2))
    x, y = logits.float(), logits.float()
    sampling_triton.apply_penalties_triton(x, state, idx, idx, rep, freq, pres)
    sampling.apply_penalties_torch(y, state, idx, idx, rep, freq, pres)
    assert torch.equal(x, y)


@pytest.mark.parametrize("case", ["top-p", "top-k+top-p+min-p"])
def test_cuda_sampler_distribution_equals_the_definition(case):
    from pagoda.kernels.sampling import reference_probs
    from pagoda.sample.sampler import Sampler
    from pagoda.sample.state import SamplingState
    from pagoda.sampling_params import SamplingParams
    kw = CASES[case]
    rows, steps = 2000, 50
    params = [SamplingParams(seed=i, **kw) for i in range(rows)]
    st = SamplingState(rows, V, torch.device("cuda"))
    for r, p in enumerate(params):
        st.add(r, p, [])
    st.flush()
    counts = np.zeros(V, dtype=np.int64)
    logits = LOGITS.cuda().expand(rows, V).contiguous()
    for pos in range(steps):
        meta = st.metadata(params, np.arange(rows), np.full(rows, pos))
        counts += np.bincount(Sampler()(logits.clone(), meta).token_ids.cpu().numpy(), minlength=V)
    p = SamplingParams(**kw)
    ref = reference_probs(LOGITS[None], torch.tensor([p.temperature]), torch.tensor([p.top_k]),
                          torch.tensor([p.top_p]), torch.tensor([p.min_p]))[0].numpy()
    assert_matches(counts, ref, rows * steps)


def test_overlap_and_batching_keep_every_sampling_setting(tmp_path):
    from test_gpu import build
    from pagoda import LLM, SamplingParams
    model = build(str(tmp_path / "m"), 0.05)
    settings = [dict(temperature=0.8, top_p=0.95, seed=1), dict(temperature=0.8, top_p=0.95, top_k=50,
                repetition_penalty=1.1, seed=2), dict(temperature=0, logprobs=5),
                dict(temperature=1.0, min_p=0.1, frequency_penalty=0.5, seed=3),
                dict(temperature=0, logit_bias={5: 2.0}, min_tokens=3, stop_token_ids=[5]),
                dict(temperature=0, prompt_logprobs=3)]
    prompts = random_prompts(12, 5, 60, 4096, seed=3)
    params = [SamplingParams(max_tokens=16, ignore_eos=True, **settings[i % len(settings)])
              for i in range(len(prompts))]
    outs = {}
    for overlap in (True, False):
        llm = LLM(model, max_model_len=256, dtype="float32")
        llm.llm_engine.core.overlap = overlap
        outs[overlap] = llm.generate(prompts, params, use_tqdm=False)
        alone = llm.generate(prompts[1:2], params[1:2], use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == outs[overlap][1].outputs[0].token_ids
        llm.shutdown()
        del llm
        gc.collect()  # the engine holds cycles: its KV cache goes only with a collection
        torch.cuda.empty_cache()
    assert [o.outputs[0].token_ids for o in outs[True]] == [o.outputs[0].token_ids for o in outs[False]]


@pytest.mark.parametrize("k", [0, 5, 20])
def test_triton_logprobs_equal_torch_reference_at_full_vocab(k):
    from pagoda.kernels.logprobs import logprobs_topk_torch
    from pagoda.kernels.logprobs_triton import logprobs_topk_triton
    g = torch.Generator(device="cuda").manual_seed(k)
    logits = (torch.randn(64, 151936, device="cuda", generator=g) * 2).bfloat16()
    chosen = torch.randint(0, 151936, (64,), device="cuda", generator=g)
    ids, lps, ranks = logprobs_topk_triton(logits, chosen, k)
    rid, rlp, rrk = logprobs_topk_torch(logits, chosen, k)
    assert torch.equal(ranks, rrk) and torch.equal(ids[:, 0], chosen)
    x = logits.float()
    assert torch.equal(x.gather(1, ids), x.gather(1, rid))  # bf16 ties: the same values
    assert (lps - rlp).abs().max() < 1e-5
