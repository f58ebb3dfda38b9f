"""Sampling parameters end to end on a tiny model."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import random_prompts
from pagoda import LLM, SamplingParams

P = random_prompts(6, 4, 30, 49152, seed=11)


def run(llm, prompts, **kw):
    return llm.generate(prompts, SamplingParams(**kw), use_tqdm=False)


def test_seeded_sampling_is_reproducible_and_independent_of_neighbours(tiny_llm):
    kw = dict(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = run(tiny_llm, [P[0]], **kw)[0].outputs[0].token_ids
    again = run(tiny_llm, [P[0]], **kw)[0].outputs[0].token_ids
    mixed = tiny_llm.generate([P[1], P[0], P[2]],
                              [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True),
                               SamplingParams(**kw),
                               SamplingParams(temperature=0.5, seed=7, max_tokens=16, ignore_eos=True)],
                              use_tqdm=False)[1].outputs[0].token_ids
    assert alone == again == mixed
    other_seed = run(tiny_llm, [P[0]], **{**kw, "seed": 99})[0].outputs[0].token_ids
    assert other_seed != alone


def test_top_k_1_equals_greedy(tiny_llm):
    g = [o.outputs[0].token_ids for o in run(tiny_llm, P, temperature=0, max_tokens=10, ignore_eos=True)]
    k1 = [o.outputs[0].token_ids for o in run(tiny_llm, P, temperature=1.5, top_k=1, max_tokens=10,
                                                ignore_eos=True)]
    assert g == k1


def test_unseeded_sampling_varies(tiny_llm):
    outs = run(tiny_llm, [P[0]] * 4, temperature=1.0, max_tokens=12, ignore_eos=True)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) > 1


def test_logprobs_cover_a_distribution_that_sums_to_one(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, max_model_len=256, max_logprobs=49152)
    out = run(llm, [P[0]], temperature=0, max_tokens=3, ignore_eos=True, logprobs=49152)[0].outputs[0]
    for step, pos in enumerate(out.logprobs):
        assert len(pos) == 49152
        total = math.fsum(math.exp(lp.logprob) for lp in pos.values())
        assert abs(total - 1.0) < 1e-4
        chosen = out.token_ids[step]
        assert pos[chosen].rank == 1  # greedy picks the top token
    assert out.cumulative_logprob == pytest.approx(sum(p[t].logprob for p, t in zip(out.logprobs, out.token_ids)))


def test_stop_string_is_cut_exactly_and_excluded(tiny_llm):
    base = run(tiny_llm, [P[2]], temperature=0, max_tokens=24, ignore_eos=True)[0].outputs[0]
    text = base.text
    assert len(text) > 10
    stop = text[6:9]
    cut = text[:text.find(stop)]
    out = run(tiny_llm, [P[2]], temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])[0].outputs[0]
    assert out.text == cut
    assert out.finish_reason == "stop" and out.stop_reason == stop
    inc = run(tiny_llm, [P[2]], temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
              include_stop_str_in_output=True)[0].outputs[0]
    assert inc.text == cut + stop


def test_stop_token_ids_and_max_tokens(tiny_llm):
    base = run(tiny_llm, [P[3]], temperature=0, max_tokens=10, ignore_eos=True)[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 10
    stop_tok = base.token_ids[4]
    first = base.token_ids.index(stop_tok)
    out = run(tiny_llm, [P[3]], temperature=0, max_tokens=10, ignore_eos=True,
              stop_token_ids=[stop_tok])[0].outputs[0]
    assert out.token_ids == base.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok


def test_min_tokens_suppresses_stop_tokens(tiny_llm):
    base = run(tiny_llm, [P[3]], temperature=0, max_tokens=10, ignore_eos=True)[0].outputs[0]
    stop_tok = base.token_ids[0]
    out = run(tiny_llm, [P[3]], temperature=0, max_tokens=10, ignore_eos=True, min_tokens=5,
              stop_token_ids=[stop_tok])[0].outputs[0]
    assert len(out.token_ids) >= 5
    assert stop_tok not in out.token_ids[:5]


def test_logit_bias_forces_a_token(tiny_llm):
    out = run(tiny_llm, [P[4]], temperature=0, max_tokens=5, ignore_eos=True,
              logit_bias={4242: 100.0})[0].outputs[0]
    assert out.token_ids == [4242] * 5


def test_repetition_and_frequency_penalties_reduce_repeats(tiny_llm):
    def repeats(ids):
        return len(ids) - len(set(ids))
    plain = run(tiny_llm, P, temperature=0, max_tokens=30, ignore_eos=True)
    pen = run(tiny_llm, P, temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=2.0)
    freq = run(tiny_llm, P, temperature=0, max_tokens=30, ignore_eos=True, frequency_penalty=2.0,
               presence_penalty=2.0)
    r_plain = sum(repeats(o.outputs[0].token_ids) for o in plain)
    assert r_plain > 0, "the tiny model should repeat itself without penalties"
    assert sum(repeats(o.outputs[0].token_ids) for o in pen) < r_plain
    assert sum(repeats(o.outputs[0].token_ids) for o in freq) < r_plain


def test_top_p_and_min_p_restrict_the_support(tiny_llama_dir):
    from pagoda.sample.sampler import _filter_top_k_top_p_min_p
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(_filter_top_k_top_p_min_p(  # noqa: E731
        logits, torch.tensor([kw.get("k", 0)]), torch.tensor([kw.get("p", 1.0)]),
        torch.tensor([kw.get("m", 0.0)]))).tolist()[0]
    assert kept(p=0.7) == [True, True, False, False]
    assert kept(p=0.5) == [True, False, False, False]
    assert kept(k=3) == [True, True, True, False]
    assert kept(m=0.5) == [True, True, False, False]  # 0.15 < 0.5 * 0.5


def test_n_samples_and_prompt_logprobs(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    llm = LLM(tiny_llama_dir, max_model_len=256)
    out = run(llm, [P[5]], temperature=1.0, seed=3, n=3, max_tokens=6, ignore_eos=True, prompt_logprobs=2)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    plp = out.prompt_logprobs
    assert len(plp) == len(P[5]) and plp[0] is None
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([P[5]])).logits[0].float(), -1)
    for pos in range(1, len(P[5])):
        tid = P[5][pos]
        assert abs(plp[pos][tid].logprob - ref[pos - 1, tid].item()) < 1e-4


def test_ignore_eos_false_stops_at_eos(tiny_llm):
    eos = tiny_llm.llm_engine.model_config.eos_token_ids[0]
    out = run(tiny_llm, [P[0]], temperature=0, max_tokens=8, logit_bias={eos: 100.0})[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    out = run(tiny_llm, [P[0]], temperature=0, max_tokens=8, logit_bias={eos: 100.0},
              ignore_eos=True)[0].outputs[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"
