"""vLLM's Python API paths: the AsyncLLMEngine streaming snippet run with `vllm` replaced by
`pagoda` (bundled model, its own process), AsyncLLMEngine's prompt forms against LLM.generate,
and LLM.beam_search against transformers' beam search on a tiny Llama.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# vLLM's documented streaming use of AsyncLLMEngine, verbatim but for the model path
VLLM_SNIPPET = '''
import asyncio

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.sampling_params import SamplingParams


async def main():
    engine_args = AsyncEngineArgs(model=MODEL, enable_prefix_caching=True)
    engine = AsyncLLMEngine.from_engine_args(engine_args)
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24)
    results_generator = engine.generate("The capital of France is", sampling_params, request_id="0")
    async for request_output in results_generator:
        print(request_output.outputs[0].text)


asyncio.run(main())
'''
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_vllm_async_engine_snippet_runs_with_pagoda(tmp_path):
    from pagoda import SamplingParams
    from pagoda.worker.loader import bundled_model_path
    model = bundled_model_path()
    script = tmp_path / "stream.py"
    script.write_text(f"MODEL = {model!r}\n" + VLLM_SNIPPET.replace("vllm", "pagoda"))
    env = {**os.environ, "PYTHONPATH": ROOT}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                         env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    # the same request on a fresh offline engine (same defaults, seed 0 for requests without one:
    # the shared bundled_llm's unseeded draws depend on what earlier tests ran on it)
    from pagoda import LLM
    fresh = LLM(model=model)
    final = fresh.generate("The capital of France is",
                           SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24))[0].outputs[0].text
    assert final.strip()
    out = run.stdout
    assert out.endswith(final + "\n")  # the last output holds the whole text
    # streamed outputs are growing prefixes of the final text (a consumer that lags gets several
    # steps merged into one output, so how many there are depends on timing)
    assert all(line in final for line in out.splitlines())


async def test_async_llm_engine_prompt_forms_match_llm_generate(tiny_llama_dir):
    from pagoda import LLM, SamplingParams, TextPrompt, TokensPrompt
    from pagoda.engine.arg_utils import AsyncEngineArgs, EngineArgs
    from pagoda.engine.async_llm_engine import AsyncLLMEngine
    from pagoda.sampling_params import SamplingParams as SP
    assert SP is SamplingParams and issubclass(AsyncEngineArgs, EngineArgs)
    kw = dict(model=tiny_llama_dir, max_model_len=256, num_gpu_blocks_override=64)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    ref = LLM(**kw).generate("Hello, my name is", params)[0].outputs[0]
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**kw, enable_prefix_caching=True,
                                                             enable_log_requests=True))
    try:
        assert engine.log_requests and engine.is_running and not engine.errored
        await engine.check_health()
        tok = await engine.get_tokenizer()
        ids = tok("Hello, my name is").input_ids
        prompts = ["Hello, my name is", TextPrompt(prompt="Hello, my name is"),
                   TokensPrompt(prompt_token_ids=ids), ids]
        for i, prompt in enumerate(prompts):
            texts = []
            async for out in engine.generate(prompt, params, request_id=str(i)):
                texts.append(out.outputs[0].text)
            assert out.finished and out.outputs[0].token_ids == ref.token_ids, prompt
            assert texts[-1] == ref.text and all(ref.text.startswith(t) for t in texts)
        assert (await engine.get_model_config()).max_model_len == 256
        with pytest.raises(ValueError, match="LoRA"):
            engine.generate("x", params, "lora", lora_request=object())
    finally:
        await engine.shutdown()


# ------------------------------------------------------------------------------ beam search

def test_beam_search_matches_transformers(tiny_llama_dir, tiny_llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from pagoda.sampling_params import BeamSearchParams
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run every beam to max_new_tokens, as ignore_eos does
    hf.generation_config.pad_token_id = 0
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = ["The quick brown fox", "Paged attention"]
    width, steps = 3, 6
    outs = tiny_llm.beam_search([{"prompt": p} for p in prompts],
                                BeamSearchParams(beam_width=width, max_tokens=steps, ignore_eos=True))
    assert len(outs) == len(prompts)
    for prompt, out in zip(prompts, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = hf.generate(ids, num_beams=width, num_return_sequences=width, max_new_tokens=steps,
                              do_sample=False, early_stopping=False, length_penalty=1.0)
        ours = [s.tokens for s in out.sequences]
        assert ours == ref.tolist()  # the same beams, best first
        best = out.sequences[0]
        with torch.no_grad():  # its cumulative logprob under transformers' model
            lp = torch.log_softmax(hf(torch.tensor([best.tokens])).logits[0].float(), -1)
        n = ids.shape[1]
        want = sum(lp[i - 1, best.tokens[i]].item() for i in range(n, len(best.tokens)))
        assert best.cum_logprob == pytest.approx(want, abs=1e-4)
        assert best.text == tok.decode(best.tokens[n:], skip_special_tokens=True)
        assert len(best.logprobs) == steps and best.finish_reason == "length"
        scores = [s.cum_logprob for s in out.sequences]
        assert scores == sorted(scores, reverse=True)


def test_beam_search_finishes_beams_at_eos_and_ranks_by_length_penalized_score():
    """The search itself on a fixed next-token distribution: every beam continues with token 1
    (logprob -0.1), EOS 9 (-0.5), 2 (-1.2) or 3 (-2.0)."""
    from types import SimpleNamespace
    from pagoda.beam_search import BeamSearchParams, beam_search
    from pagoda.outputs import Logprob
    dist = {1: -0.1, 9: -0.5, 2: -1.2, 3: -2.0}
    calls = []

    def generate(prompts, sp):
        calls.append([p["prompt_token_ids"] for p in prompts])
        row = {t: Logprob(v) for t, v in dist.items()}
        return [SimpleNamespace(outputs=[SimpleNamespace(logprobs=[row])]) for _ in prompts]

    out = beam_search(generate, lambda k, t: k, [[0]], BeamSearchParams(beam_width=2, max_tokens=2), {9},
                      100, decode=lambda ids: " ".join(map(str, ids)))[0]
    assert calls == [[[0]], [[0, 1], [0, 2]]]  # EOS left the search; the two best went on
    # scores: cum / len (prompt counted, EOS not): [0,1,1] -0.2/3, [0,1,9] -0.6/2, [0,9] -0.5/1
    assert [s.tokens for s in out.sequences] == [[0, 1, 1], [0, 1, 9]]
    assert [s.finish_reason for s in out.sequences] == ["length", "stop"]
    assert [s.text for s in out.sequences] == ["1 1", "1"]  # EOS is not in the text
    assert out.sequences[1].cum_logprob == pytest.approx(-0.6)
    ignoring = beam_search(generate, lambda k, t: k, [[0]],
                           BeamSearchParams(beam_width=2, max_tokens=2, ignore_eos=True), {9}, 100)[0]
    # EOS is just a token: [0,9] (-0.5 / 1) goes on instead of [0,2] (-1.2 / 2), and
    # [0,9,1] (-0.6 / 3) beats [0,1,9] (-0.6 / 2, a final EOS still does not count)
    assert [s.tokens for s in ignoring.sequences] == [[0, 1, 1], [0, 9, 1]]
    assert [s.finish_reason for s in ignoring.sequences] == ["length", "length"]


def test_beam_search_limits(tiny_llm):
    from pagoda.sampling_params import BeamSearchParams
    with pytest.raises(ValueError, match="beam_width: 11 needs 22 logprobs"):
        tiny_llm.beam_search(["Hello"], BeamSearchParams(beam_width=11, max_tokens=2))
    with pytest.raises(ValueError, match="beam_width must be a positive integer"):
        BeamSearchParams(beam_width=0, max_tokens=2)
    near = tiny_llm.llm_engine.model_config.max_model_len - 2  # beams stop at the context limit
    out = tiny_llm.beam_search([[5] * near], BeamSearchParams(beam_width=2, max_tokens=8, ignore_eos=True))
    assert all(len(s.tokens) == near + 2 and s.finish_reason == "length" for s in out[0].sequences)
