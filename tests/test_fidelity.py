"""Greedy fidelity against the Hugging Face reference model on the same weights (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_WINDOW, random_prompts
from pagoda import LLM, SamplingParams

N_NEW = 12


def hf_greedy(model, prompt: list[int], n_new: int):
    """Reference greedy continuation and per-step log-softmax of the raw logits."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                         pad_token_id=0)
    toks = out.sequences[0, len(prompt):].tolist()
    lps = [torch.log_softmax(l[0].float(), -1) for l in out.logits]
    return toks, lps


def check_against_hf(model_dir: str, prompts: list[list[int]], hf_model=None, llm=None, n_new=N_NEW,
                     top=5, atol=1e-4):
    from transformers import AutoModelForCausalLM
    hf = hf_model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = llm or LLM(model_dir, max_model_len=1024)
    _greedy_matches(hf, llm, prompts, n_new, top, atol)


def _greedy_matches(hf, llm, prompts, n_new=N_NEW, top=5, atol=1e-4):
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True,
                                                logprobs=top), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ref_toks, ref_lps = hf_greedy(hf, prompt, n_new)
        got = out.outputs[0]
        assert got.token_ids == ref_toks, f"prompt len {len(prompt)}: {got.token_ids} != {ref_toks}"
        for step, (pos_lp, ref) in enumerate(zip(got.logprobs, ref_lps)):
            ref_top = torch.topk(ref, top)
            ours = {tid: lp.logprob for tid, lp in pos_lp.items()}
            for tid, v in zip(ref_top.indices.tolist(), ref_top.values.tolist()):
                assert tid in ours, f"step {step}: reference top-{top} token {tid} missing"
                assert abs(ours[tid] - v) <= atol, f"step {step} token {tid}: {ours[tid]} vs {v}"


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen2"])
def test_greedy_matches_transformers_in_one_batch(kind, request):
    model_dir = request.getfixturevalue(f"tiny_{kind}_dir")
    prompts = random_prompts(9, 3, 60, 49152, seed=1)  # 9 prompts of different lengths, one batch
    assert len({len(p) for p in prompts}) == len(prompts)
    check_against_hf(model_dir, prompts)


@pytest.fixture(scope="module")
def bundled_hf():
    from transformers import AutoModelForCausalLM
    from pagoda.worker.loader import bundled_model_path
    import os
    path = bundled_model_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("quantization", ["gguf", "int8"])
def test_bundled_gguf_matches_transformers_gguf(quantization, bundled_llm, bundled_hf):
    """The bundled SmolLM2 Q4_1 GGUF: our weights + Q/K un-permute vs transformers' GGUF loader.
    gguf, the default CPU path, multiplies with the file's Q4_1/Q8_0 blocks as they are; int8's
    8-bit groups hold them exactly."""
    from pagoda import LLM
    llm = bundled_llm if quantization == "gguf" else LLM(max_model_len=2048, quantization="int8")
    assert llm.llm_engine.core.worker.quantization == quantization
    tok = llm.get_tokenizer()
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    prompts = [tok(t).input_ids for t in texts]
    check_against_hf(None, prompts, hf_model=bundled_hf, llm=llm, n_new=32, atol=1e-4)


# 3 to 8 windows long; 12 new tokens run through one or two windows more
LONG_PROMPTS = random_prompts(6, 3 * TINY_WINDOW, 8 * TINY_WINDOW, 49152, seed=7)


def check_sliding_window(model_dir: str, hf_model) -> None:
    """Greedy tokens and top-5 logprobs of a sliding-window model against transformers: one
    batch of prompts several windows long; then chunked prefill (12-token chunks) over 4-token
    pages (a window spans pages and a chunk starts mid-window), and prompts whose first 5
    windows hit the prefix cache."""
    _greedy_matches(hf_model, LLM(model_dir, max_model_len=1024), LONG_PROMPTS)
    llm = LLM(model_dir, max_model_len=1024, max_num_batched_tokens=12, block_size=4)
    _greedy_matches(hf_model, llm, LONG_PROMPTS)
    shared = max(LONG_PROMPTS, key=len)[:5 * TINY_WINDOW]  # 10 cached pages
    hits = llm.llm_engine.core.kv_cache_manager.hits
    _greedy_matches(hf_model, llm, [shared + p[:k] for p, k in zip(LONG_PROMPTS, (3, 9, 17))])
    assert llm.llm_engine.core.kv_cache_manager.hits - hits >= 3 * (len(shared) - 4)


def test_mistral_sliding_window_matches_transformers(tiny_mistral_dir):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_mistral_dir, dtype=torch.float32).eval()
    assert hf.config.sliding_window == TINY_WINDOW
    check_sliding_window(tiny_mistral_dir, hf)
