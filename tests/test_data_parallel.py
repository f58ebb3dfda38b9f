"""--data-parallel-size 2: two engine cores (each its own model copy and KV cache) behind one
front end. Every request comes back once, with the same outputs as one engine core gives, both
offline and through `pagoda serve` (two engine-core processes)."""
from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from conftest import random_prompts
from pagoda import LLM, SamplingParams
from server_utils import PagodaServer, child_pids

PARAMS = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
          SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)]


def run(llm, prompts):
    outs = llm.generate(prompts, [PARAMS[i % 2] for i in range(len(prompts))], use_tqdm=False)
    return [(o.request_id, o.outputs[0].token_ids) for o in outs]


def test_offline_dp2_equals_dp1(tiny_llama_dir):
    prompts = random_prompts(12, 5, 60, 49152, seed=21)
    one = run(LLM(tiny_llama_dir, max_model_len=256), prompts)
    llm = LLM(tiny_llama_dir, max_model_len=256, data_parallel_size=2)
    eng = llm.llm_engine
    assert len(eng.engine_cores) == 2
    two = run(llm, prompts)
    assert [t for _, t in two] == [t for _, t in one]
    assert len({rid for rid, _ in two}) == len(prompts)  # each request once
    # both engine cores did work, and both are idle again
    assert all(c.core.scheduler.prompt_tokens_total > 0 for c in eng.engine_cores)
    assert not eng.has_unfinished_requests()


@pytest.mark.slow
def test_served_dp2_equals_offline(tiny_llama_dir):
    prompts = random_prompts(8, 5, 40, 49152, seed=22)
    expect = [t for _, t in run(LLM(tiny_llama_dir, max_model_len=256), prompts)]
    with PagodaServer([tiny_llama_dir, "--served-model-name", "tiny", "--max-model-len", "256",
                       "--data-parallel-size", "2", "--engine-core", "process"]) as s:
        cores = [c for c in child_pids(s.proc.pid) if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]
        assert len(cores) == 2

        def ask(i):
            p = PARAMS[i % 2]
            body = {"prompt": prompts[i], "max_tokens": 10, "ignore_eos": True, "temperature": p.temperature,
                    "return_token_ids": True}
            if p.seed is not None:
                body.update(seed=p.seed, top_p=p.top_p)
            r = httpx.post(s.url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]
        with cf.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, range(len(prompts))))
        assert got == expect
