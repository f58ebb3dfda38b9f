"""`pagoda bench throughput` end to end on CPU: a random-weight tiny model through pagoda and the
transformers baseline, and the bundled model on a JSONL dataset. Counts must be exact."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import types

import pytest

from pagoda.bench.workloads import random_token_prompts
from pagoda.entrypoints.cli import main

pytestmark = pytest.mark.timeout(300)

HF_BASELINE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "hf_baseline.py")


def run_json(tmp_path, *argv) -> dict:
    out = tmp_path / "tp.json"
    assert main(["bench", "throughput", "--disable-tqdm", "--output-json", str(out), *map(str, argv)]) == 0
    return json.loads(out.read_text())


def w1_lengths(n, lo, hi, vocab, seed=0):
    """The W1 definition written out again: a length, then that many ids, per request."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(n):
        k = rng.randint(lo, hi)
        lengths.append(k)
        for _ in range(k):
            rng.randrange(100, vocab - 100)
    return lengths


def test_tiny_model_pagoda_and_hf_counts(tmp_path, capsys):
    res = run_json(tmp_path, "--model-shape", "tiny-llama", "--backend", "pagoda,hf", "--num-prompts", 12,
                   "--input-len-range", 8, 40, "--output-len", 10, "--hf-batch-size", 4, "--seed", 5)
    assert [r["backend"] for r in res["results"]] == ["pagoda", "hf"]
    assert res["reference"] == "hf"
    in_tokens = sum(w1_lengths(12, 8, 40, 49152, seed=5))
    assert res["workload"]["input_tokens"] == in_tokens
    for r in res["results"]:
        assert r["counts_ok"] and not r["errors"]
        assert r["output_tokens"] == r["expected_output_tokens"] == 12 * 10
        assert r["input_tokens"] == in_tokens
        assert r["requests_per_s"] * r["elapsed_s"] == pytest.approx(12)
        assert r["output_tok_per_s"] * r["elapsed_s"] == pytest.approx(120)
    pagoda, hf = res["results"]
    assert hf["ratio_vs_hf"] == 1
    assert pagoda["ratio_vs_hf"] == pytest.approx(pagoda["output_tok_per_s"] / hf["output_tok_per_s"])
    table = capsys.readouterr().out
    assert "120/120" in table and "MISMATCH" not in table and "vs hf" in table


def test_sampling_settings_apply_to_every_request(tmp_path, capsys):
    res = run_json(tmp_path, "--model-shape", "tiny-llama", "--num-prompts", 4, "--input-len", 12,
                   "--output-len", 6, "--temperature", 0.8, "--top-p", 0.95, "--top-k", 50,
                   "--repetition-penalty", 1.1, "--logprobs", 5)
    assert res["workload"]["sampling"] == {"temperature": 0.8, "top_p": 0.95, "top_k": 50,
                                           "repetition_penalty": 1.1, "logprobs": 5}
    (r,) = res["results"]
    assert r["counts_ok"] and r["output_tokens"] == 24
    assert "top_p 0.95" in capsys.readouterr().out


def test_fixed_input_len_and_plot(tmp_path):
    png = tmp_path / "tp.png"
    res = run_json(tmp_path, "--model-shape", "tiny-llama", "--num-prompts", 5, "--input-len", 16,
                   "--output-len", 7, "--plot", png, "--no-warmup")
    (r,) = res["results"]
    assert (r["backend"], r["input_tokens"], r["output_tokens"], r["counts_ok"]) == ("pagoda", 80, 35, True)
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def smollm_tokenizer():
    """The bundled model's tokenizer (its vocabulary is tiny-llama's), and where it lives."""
    from pagoda.worker import loader
    src = loader.resolve_model(None)
    return loader.load_tokenizer(src), src.tokenizer_dir


def test_jsonl_dataset_tokenized_once_for_all_backends(tmp_path, smollm_tokenizer):
    tok, tok_dir = smollm_tokenizer
    prompts = ["Hello there!", "Name three colours.", "What is 2 + 2?"]
    ds = tmp_path / "prompts.jsonl"
    ds.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n\n")
    res = run_json(tmp_path, "--model-shape", "tiny-llama", "--tokenizer", tok_dir, "--dataset", ds,
                   "--num-prompts", 5, "--output-len", 6, "--backend", "pagoda,hf", "--no-warmup")
    expected_in = sum(len(tok(prompts[i % 3]).input_ids) for i in range(5))
    assert res["workload"]["kind"] == "dataset" and res["workload"]["input_tokens"] == expected_in
    for r in res["results"]:
        assert r["input_tokens"] == expected_in and r["output_tokens"] == 30 and r["counts_ok"]


def test_synthetic_chat_uses_the_chat_template(tmp_path, smollm_tokenizer):
    from pagoda.bench.workloads import SYNTHETIC_CHAT
    tok, tok_dir = smollm_tokenizer
    res = run_json(tmp_path, "--model-shape", "tiny-llama", "--tokenizer", tok_dir, "--workload", "synthetic-chat",
                   "--num-prompts", 4, "--output-len", 5, "--no-warmup")
    rendered = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in SYNTHETIC_CHAT[:4]]
    assert all("<|im_start|>assistant" in r for r in rendered)
    (r,) = res["results"]
    assert r["input_tokens"] == sum(len(tok(t, add_special_tokens=False).input_ids) for t in rendered)
    assert r["output_tokens"] == 20 and r["counts_ok"]


def test_random_prompts_follow_w1():
    prompts = random_token_prompts(20, 128, 1024, 151936, seed=0)
    assert [len(p) for p in prompts] == w1_lengths(20, 128, 1024, 151936)
    assert all(100 <= t < 151936 - 100 for p in prompts for t in p)
    if os.path.exists(HF_BASELINE):  # the reference implementation beside the repository
        spec = importlib.util.spec_from_file_location("hf_baseline", HF_BASELINE)
        ref = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ref)
        assert ref.workload(types.SimpleNamespace(vocab_size=151936), 20, 128, 1024) == prompts


@pytest.mark.parametrize("argv, message", [
    (["--model-shape", "tiny-llama", "--workload", "synthetic-chat"], "--model-shape: tiny-llama has no tokenizer"),
    (["--model-shape", "tiny-llama", "--model", "x"], "--model-shape: give either"),
    (["--model-shape", "tiny-llama", "--output-len", "0"], "--output-len: must be >= 1"),
    (["--model-shape", "tiny-llama", "--input-len-range", "9", "3"], "--input-len-range: need 1 <= LO <= HI"),
    (["--model-shape", "tiny-llama", "--top-p", "1.5"], "--top-p: must be in (0, 1], got 1.5"),
    (["--model-shape", "tiny-llama", "--repetition-penalty", "0"], "--repetition-penalty: must be greater"),
    (["--model-shape", "tiny-llama", "--temperature", "0.8", "--backend", "pagoda,hf"],
     "--temperature: sampling settings apply to the pagoda backend only"),
])
def test_bad_flags_get_one_line(argv, message, capsys):
    assert main(["bench", "throughput", "--disable-tqdm", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bad_dataset_line_is_named(tmp_path, capsys):
    ds = tmp_path / "bad.jsonl"
    ds.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    assert main(["bench", "throughput", "--dataset", str(ds), "--disable-tqdm"]) == 2
    assert f"{ds}:2" in capsys.readouterr().err


def test_unknown_backend_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "throughput", "--backend", "pagoda,vllm"])
    assert "unknown backend(s) vllm" in capsys.readouterr().err
