"""The offline LLM API on the bundled model, and bad input."""
from __future__ import annotations

import re

import pytest

from pagoda import LLM, SamplingParams


def test_default_model_generates_sensible_text(bundled_llm):
    out = bundled_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert len(out) == 1
    text = out[0].outputs[0].text
    assert out[0].prompt == "Hello" and out[0].prompt_token_ids
    words = re.findall(r"[A-Za-z]{2,}", text)  # real words, not byte garbage
    assert len(words) >= 3 and sum(map(len, words)) >= len(text) // 2, text


def test_chat_answers_paris(bundled_llm):
    out = bundled_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text


def test_chat_batch_of_conversations_keeps_order(bundled_llm):
    convs = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}]]
    outs = bundled_llm.chat(convs, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert "Paris" in outs[0].outputs[0].text and "Paris" not in outs[1].outputs[0].text


def test_results_in_input_order_with_token_prompts(bundled_llm):
    tok = bundled_llm.get_tokenizer()
    texts = ["One two three", "A much longer prompt that takes more steps to prefill than the first one"]
    outs = bundled_llm.generate([tok(t).input_ids for t in texts],
                                [SamplingParams(temperature=0, max_tokens=30), SamplingParams(temperature=0, max_tokens=2)],
                                use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [tok(t).input_ids for t in texts]
    assert len(outs[1].outputs[0].token_ids) <= 2
    assert outs[0].metrics.first_token_time >= outs[0].metrics.arrival_time


@pytest.mark.parametrize("kw,name", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n"), (dict(max_tokens=0), "max_tokens"), (dict(top_k=-2), "top_k"),
    (dict(min_p=2.0), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"), (dict(stop=[""]), "stop"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
])
def test_invalid_sampling_params_name_the_parameter(kw, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)


def test_bad_prompts_raise_and_engine_keeps_working(tiny_llm):
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.generate("", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match=r"2000 tokens.*max_model_len is 1024"):
        tiny_llm.generate([[5] * 2000], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="max_tokens"):
        tiny_llm.generate([[5] * 1000], SamplingParams(max_tokens=100), use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_llm.generate([[10**9]], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="logprobs"):
        tiny_llm.generate([[5, 6]], SamplingParams(max_tokens=2, logprobs=1000), use_tqdm=False)
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                            use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    assert not tiny_llm.llm_engine.has_unfinished_requests()


def test_bad_models_and_flags(tmp_path, tiny_llama_dir):
    import json
    import shutil
    with pytest.raises(ValueError, match="--model.*does not exist"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="--model.*(hub|cache)"):
        LLM("no-such-org/no-such-model")
    bad = tmp_path / "bad-arch"
    shutil.copytree(tiny_llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    cfg["model_type"] = "gpt_neox"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not supported"):
        LLM(str(bad))
    with pytest.raises(ValueError, match="--block-size"):
        LLM(tiny_llama_dir, block_size=12)
    with pytest.raises(ValueError, match="--tensor-parallel-size"):
        LLM(tiny_llama_dir, tensor_parallel_size=0)
    with pytest.raises(ValueError, match="--max-model-len"):
        LLM(tiny_llama_dir, max_model_len=10**6)
    with pytest.raises(ValueError, match="--kv-cache-memory"):
        LLM(tiny_llama_dir, max_model_len=4096, kv_cache_memory=4096)
