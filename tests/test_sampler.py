"""The batched sampler (pagoda.sample) on fixed logits, without a model: the sampled distribution
against the definition (chi-square over >= 100k draws), penalties / logit bias / min_tokens
token for token against the formulas, seeded rows alone and among 32 mixed rows, logprobs
against torch's log_softmax, structured-output masks and begin-suppressed tokens."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pagoda.kernels.sampling import reference_probs
from pagoda.sample.sampler import Sampler
from pagoda.sample.state import SamplingState
from pagoda.sampling_params import SamplingParams

V = 64


def make_state(rows: list[SamplingParams], prompts=None, vocab=V, seed=0) -> SamplingState:
    st = SamplingState(len(rows), vocab, torch.device("cpu"), seed)
    for r, p in enumerate(rows):
        st.add(r, p, prompts[r] if prompts else [])
    st.flush()
    return st


def sample(st: SamplingState, params, logits, positions, rows=None):
    rows = np.arange(len(params)) if rows is None else np.asarray(rows)
    meta = st.metadata(params, rows, np.asarray(positions))
    return Sampler()(logits.clone(), meta)


def chi2_critical(df: int, z: float = 4.75) -> float:
    """Wilson-Hilferty: the chi-square value a correct sampler exceeds with probability ~1e-6."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_matches(counts: np.ndarray, probs: np.ndarray, n: int) -> None:
    """No draw outside the support; chi-square over cells expecting >= 5 draws (the rest pooled)."""
    assert counts[probs == 0].sum() == 0, "a token outside the filtered set was drawn"
    exp = probs * n
    big = exp >= 5
    obs_c, exp_c = list(counts[big]), list(exp[big])
    if (~big & (probs > 0)).any():
        obs_c.append(counts[~big].sum())
        exp_c.append(exp[~big].sum())
    obs_c, exp_c = np.array(obs_c, dtype=float), np.array(exp_c)
    df = len(obs_c) - 1
    if df == 0:
        assert obs_c[0] == n
        return
    chi2 = float(((obs_c - exp_c) ** 2 / exp_c).sum())
    assert chi2 < chi2_critical(df), f"chi2 {chi2:.1f} over {df} degrees of freedom"


# a row of logits flat enough that top-p and min-p cut in the middle of the vocabulary
LOGITS = torch.linspace(2.5, -2.5, V)[torch.randperm(V, generator=torch.Generator().manual_seed(3))]

CASES = {
    "temperature": dict(temperature=0.9),
    "top-k": dict(temperature=1.0, top_k=12),
    "top-p": dict(temperature=0.8, top_p=0.7),
    "min-p": dict(temperature=1.2, min_p=0.15),
    "top-k+top-p": dict(temperature=1.0, top_k=20, top_p=0.6),
    "min-p+top-p": dict(temperature=1.0, min_p=0.3, top_p=0.5),
    "top-k+top-p+min-p": dict(temperature=1.3, top_k=30, top_p=0.8, min_p=0.1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_distribution_equals_the_definition(case):
    kw = CASES[case]
    rows, steps = 1000, 100   # 100k draws: 1000 seeded rows x 100 output positions
    params = [SamplingParams(seed=1000 * i + 7, **kw) for i in range(rows)]
    st = make_state(params)
    logits = LOGITS.expand(rows, V)
    counts = np.zeros(V, dtype=np.int64)
    for pos in range(steps):
        tok = sample(st, params, logits, np.full(rows, pos)).token_ids
        counts += np.bincount(tok.numpy(), minlength=V)
    p = SamplingParams(**kw)
    ref = reference_probs(LOGITS[None], torch.tensor([p.temperature]), torch.tensor([p.top_k]),
                          torch.tensor([p.top_p]), torch.tensor([p.min_p]))[0].numpy()
    support = int((ref > 0).sum())
    assert 1 < support < V or case == "temperature"
    assert_matches(counts, ref, rows * steps)


def test_the_chi_square_check_catches_a_wrong_order():
    """min-p applied after top-p (not vLLM's order) is a different distribution: the same check
    rejects it, so the test above can fail."""
    kw = CASES["min-p+top-p"]
    good = reference_probs(LOGITS[None], torch.tensor([1.0]), torch.tensor([0]),
                           torch.tensor([kw["top_p"]]), torch.tensor([kw["min_p"]]))[0].numpy()
    after = reference_probs(LOGITS[None], torch.tensor([1.0]), torch.tensor([0]),
                            torch.tensor([kw["top_p"]]), torch.tensor([0.0]))[0]
    after = torch.where(after >= kw["min_p"] * after.max(), after, torch.zeros_like(after))
    after = (after / after.sum()).numpy()
    assert (good > 0).sum() < (after > 0).sum()
    rng = np.random.default_rng(0)
    draws = rng.choice(V, size=100_000, p=after)
    with pytest.raises(AssertionError):
        assert_matches(np.bincount(draws, minlength=V), good, 100_000)


def reference_greedy_step(logits, prompt, out, p: SamplingParams):
    """The formulas, one row, in vLLM's order: min_tokens, logit bias, repetition (prompt and
    output tokens), frequency and presence (output counts); then the argmax."""
    x = logits.clone()
    if len(out) < p.min_tokens:
        for t in list(p.stop_token_ids) + ([] if p.ignore_eos else list(p.eos_token_ids)):
            x[t] = float("-inf")
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    seen = set(prompt) | set(out)
    for t in seen:
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=V).float() if out \
        else torch.zeros(V)
    x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    return int(x.argmax())


def test_penalties_bias_and_min_tokens_follow_the_formulas_token_for_token():
    g = torch.Generator().manual_seed(5)
    params = [SamplingParams(temperature=0, repetition_penalty=1.8),
              SamplingParams(temperature=0, frequency_penalty=0.7, presence_penalty=0.4),
              SamplingParams(temperature=0, repetition_penalty=0.7, frequency_penalty=-0.3),
              SamplingParams(temperature=0, logit_bias={3: 2.5, 17: -1.0, 40: 1.5}),
              SamplingParams(temperature=0, min_tokens=6, stop_token_ids=[9, 11], eos_token_ids=(2,)),
              SamplingParams(temperature=0, min_tokens=4, stop_token_ids=[5], ignore_eos=True,
                             eos_token_ids=(2,), repetition_penalty=1.3, logit_bias={5: 3.0}),
              SamplingParams(temperature=0),
              SamplingParams(temperature=0, presence_penalty=1.5, logit_bias={60: 0.5})]
    prompts = [torch.randint(0, V, (12,), generator=g).tolist() for _ in params]
    st = make_state(params, prompts)
    outs = [[] for _ in params]
    for step in range(30):
        logits = torch.randn(len(params), V, generator=g) * 2
        # stop tokens are the favourites: min_tokens has something to hold back
        logits[4, [9, 11, 2]] += 4
        logits[5, [5, 2]] += 4
        got = sample(st, params, logits, [len(o) for o in outs]).token_ids.tolist()
        want = [reference_greedy_step(logits[i], prompts[i], outs[i], p) for i, p in enumerate(params)]
        assert got == want, f"step {step}"
        for o, t in zip(outs, got):
            o.append(t)
    assert not {9, 11, 2} & set(outs[4][:6]) and {9, 11, 2} & set(outs[4][6:])
    assert 5 not in outs[5][:4] and 5 in outs[5][4:]


def test_seeded_rows_equal_alone_and_among_32_mixed_rows():
    g = torch.Generator().manual_seed(9)
    mixed = [SamplingParams(temperature=0),
             SamplingParams(temperature=1.0),
             SamplingParams(temperature=0.7, top_p=0.8),
             SamplingParams(temperature=1.1, top_k=10, seed=4),
             SamplingParams(temperature=0.9, min_p=0.1, repetition_penalty=1.2),
             SamplingParams(temperature=1.0, top_k=25, top_p=0.9, seed=77, logprobs=3),
             SamplingParams(temperature=0.6, logit_bias={1: 1.0}, frequency_penalty=0.5),
             SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=[0])]
    batch = [mixed[i % len(mixed)].clone(seed=mixed[i % len(mixed)].seed if i % 3 else 100 + i)
             for i in range(32)]
    seeded = [i for i, p in enumerate(batch) if p.seed is not None and not p.greedy]
    assert len(seeded) >= 12
    logits = torch.randn(32, V, generator=g) * 1.5
    prompts = [torch.randint(0, V, (6,), generator=g).tolist() for _ in batch]
    st = make_state(batch, prompts, seed=123)
    together = []
    for pos in range(20):
        together.append(sample(st, batch, logits, np.full(32, pos)).token_ids)
    together = torch.stack(together, 1)
    for i in seeded:
        alone_state = make_state([batch[i]], [prompts[i]], seed=999)
        toks = [int(sample(alone_state, [batch[i]], logits[i:i + 1], [pos]).token_ids) for pos in range(20)]
        assert toks == together[i].tolist(), i
    assert len({tuple(together[i].tolist()) for i in seeded}) > 1


def test_logprobs_equal_torch_log_softmax():
    g = torch.Generator().manual_seed(2)
    params = [SamplingParams(temperature=0, logprobs=5), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=0.8, top_p=0.9, seed=2, logprobs=0),
              SamplingParams(temperature=0, repetition_penalty=2.0, logprobs=3)]
    st = make_state(params, [[1, 2, 3]] * 4)
    logits = torch.randn(4, V, generator=g) * 3
    res = sample(st, params, logits, [0, 0, 0, 0])
    assert res.logprobs_rows.tolist() == [0, 2, 3] and res.logprobs_keep == [5, 0, 3]
    lists = res.logprobs.lists(res.logprobs_keep)
    ref = torch.log_softmax(logits, -1)   # raw logprobs: before penalties and temperature
    for j, i in enumerate(res.logprobs_rows):
        tok = int(res.token_ids[i])
        ids, lps, rank = lists.token_ids[j], lists.logprobs[j], lists.ranks[j]
        assert ids[0] == tok and abs(lps[0] - ref[i, tok].item()) < 1e-5
        assert rank == int((ref[i] > ref[i, tok]).sum()) + 1
        k = res.logprobs_keep[j]
        top = ref[i].topk(k) if k else None
        assert len(ids) == 1 + k
        if k:
            assert ids[1:] == top.indices.tolist()
            assert np.allclose(lps[1:], top.values.numpy(), atol=1e-5, rtol=0)
    assert lists.ranks[0] == 1   # greedy without penalties takes the top token


def test_structured_outputs_bitmask_composes_with_every_setting():
    """The runner masks structured-output rows in place (pagoda.sample.grammar_bitmask) before
    the sampler: whatever the row's setting, no forbidden token comes out, the masked row's
    greedy pick is its best allowed token, and its logprobs are those of the masked logits."""
    from pagoda.sample.grammar_bitmask import apply_token_bitmask
    from pagoda.engine.scheduler_output import GrammarBitmask
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3),
              SamplingParams(temperature=1.0, top_k=5, seed=4),
              SamplingParams(temperature=0.9, top_p=0.8, repetition_penalty=1.5, seed=5),
              SamplingParams(temperature=0, logprobs=2, logit_bias={8: 5.0}),
              SamplingParams(temperature=1.0, min_p=0.2, seed=6)]
    n = len(params)
    st = make_state(params, [[7, 30, 41]] * n)
    allowed = torch.zeros(n, V, dtype=torch.bool)
    allowed[0, [7, 30]] = True
    allowed[1, 40:50] = True
    allowed[2, [1, 2, 3, 60, 61, 62, 63]] = True
    allowed[3, [7, 30, 41, 42]] = True
    allowed[4, [8, 9, 10]] = True
    free = 5   # an unconstrained row in the same batch
    bits = (allowed.view(n, V // 32, 32).int() << torch.arange(32)).sum(-1).int()
    constrained = [f"r{i}" for i in range(n) if i != free]
    req_ids = [f"r{i}" for i in range(n)]
    g = torch.Generator().manual_seed(1)
    seen_free = set()
    for pos in range(40):
        logits = torch.randn(n, V, generator=g)
        grammar = GrammarBitmask(constrained, bits[[int(r[1:]) for r in constrained]])
        masked = apply_token_bitmask(logits.clone(), grammar, req_ids)
        assert torch.equal(masked[free], logits[free])
        res = sample(st, params, masked, [pos] * n)
        tok = res.token_ids.tolist()
        assert all(allowed[i, t] for i, t in enumerate(tok) if i != free)
        seen_free.add(tok[free])
        if pos == 0:
            assert tok[0] == max((7, 30), key=lambda t: logits[0, t])
            lists = res.logprobs.lists(res.logprobs_keep)
            ref = torch.log_softmax(masked[4], -1)
            assert abs(lists.logprobs[0][0] - ref[tok[4]].item()) < 1e-5
            assert set(lists.token_ids[0][1:]) <= {8, 9, 10}
    assert not seen_free <= set(allowed[free].nonzero().flatten().tolist())


def test_begin_suppressed_tokens_never_come_first():
    params = [SamplingParams(temperature=0, begin_suppress_token_ids=(5, 9)),
              SamplingParams(temperature=1.0, seed=2, begin_suppress_token_ids=(5,)),
              SamplingParams(temperature=0)]
    st = make_state(params)
    logits = torch.zeros(3, V)
    logits[:, 5] = 20
    logits[:, 9] = 19
    first = sample(st, params, logits, [0, 0, 0]).token_ids.tolist()
    assert first[0] not in (5, 9) and first[1] != 5 and first[2] == 5
    assert sample(st, params, logits, [1, 1, 1]).token_ids.tolist()[0] == 5


def test_a_row_taken_twice_before_a_flush_keeps_the_last_request():
    """A request that finishes and a new one that takes its row before the next flush: the
    flush writes the newcomer's parameters and token statistics, not a mix of both."""
    old = SamplingParams(temperature=0, repetition_penalty=5.0, logit_bias={4: 50.0})
    new = SamplingParams(temperature=0, repetition_penalty=1.5)
    st = SamplingState(2, V, torch.device("cpu"))
    st.add(0, old, [1, 2, 3])
    st.add(1, new, [7, 8])
    st.add(0, new, [7, 8])
    st.flush()
    assert st.params[0].tolist() == st.params[1].tolist()
    assert torch.equal(st.token_state[0], st.token_state[1])
    assert st.token_state[0].nonzero().flatten().tolist() == [7, 8]
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(4))
    logits[:, 4] = -10
    logits[:, 2] = 10
    assert sample(st, [new, new], logits, [0, 0]).token_ids.tolist() == [2, 2]
