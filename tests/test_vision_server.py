"""Vision models through a real `pagoda serve`: chat with images as base64 data URLs through the
openai SDK against transformers (every family), streaming, /v1/models' vision capability,
metrics; every bad image input as an OpenAI error with its `param` while the engine keeps
serving; and the LMDeploy guide's command line."""
from __future__ import annotations

import base64
import io
import subprocess
import sys

import httpx
import pytest
import torch

from pagoda import LLM, SamplingParams
from server_utils import PagodaServer, metric
from vlm_utils import KINDS, hf_greedy, hf_inputs, hf_model, random_image

SERVE = ["--max-model-len", "512", "--num-gpu-blocks-override", "128", "--disable-log-requests"]


def data_url(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(*parts) -> list[dict]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else
               {"type": "image_url", "image_url": {"url": data_url(p)}} for p in parts]
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("kind", KINDS)
def test_chat_with_data_urls_matches_transformers(kind, request):
    path = request.getfixturevalue(f"tiny_{kind}_dir")
    a, b = random_image(60, 36, 1), random_image(33, 70, 2)
    messages = user("Compare", a, "with", b, "please.")
    # the prompt ids as the offline engine renders the same conversation
    ids = LLM(path, max_model_len=512, num_gpu_blocks_override=64).chat(
        messages, SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_token_ids
    ref_toks, ref_lps = hf_greedy(hf_model(path), hf_inputs(kind, path, ids, [a, b]), 6)
    with PagodaServer([path, *SERVE]) as srv:
        client = srv.openai_client()
        card = client.models.list().data[0]
        assert card.capabilities == ["vision"]
        r = client.chat.completions.create(model=card.id, messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=5,
                                           extra_body={"ignore_eos": True, "return_token_ids": True})
        choice = r.choices[0]
        assert choice.token_ids == ref_toks
        assert r.usage.prompt_tokens == len(ids)
        for pos, ref in zip(choice.logprobs.content, ref_lps):
            want = torch.topk(ref, 5).values.tolist()
            got = sorted((t.logprob for t in pos.top_logprobs), reverse=True)
            assert max(abs(x - y) for x, y in zip(got, want)) <= 1e-4
        # streamed: the same text
        chunks = client.chat.completions.create(model=card.id, messages=messages, max_tokens=6,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
        m = srv.metrics()
        assert metric(m, "pagoda:images_processed_total") == 4
        assert metric(m, "pagoda:images_encoded_total") == 2  # the stream's images hit the caches
        assert metric(m, "pagoda:vision_encoder_time_seconds_count") >= 1


def _error(r: httpx.Response, status: int, param: str, match: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert match in err["message"], err
    assert err["type"] == ("invalid_request_error")


def test_bad_image_inputs(tiny_qwen2_vl_dir, tmp_path):
    import socket
    img = random_image(40, 40, 3)
    (tmp_path / "ok.png").write_bytes(base64.b64decode(data_url(img).split(",", 1)[1]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)  # accepts connections, never answers: the fetch times out
        silent = f"http://127.0.0.1:{s.getsockname()[1]}/img.png"
        args = [tiny_qwen2_vl_dir, *SERVE, "--limit-mm-per-prompt", '{"image": 2}',
                "--max-image-bytes", "20KB", "--max-image-pixels", "20000", "--media-fetch-timeout", "1",
                "--allowed-media-domains", "127.0.0.1", "--allowed-local-media-path", str(tmp_path)]
        with PagodaServer(args) as srv:
            def chat(*parts, raw=None):
                msgs = raw or [{"role": "user", "content": [
                    {"type": "text", "text": p} if isinstance(p, str) and not p.startswith(("data:", "http", "file", "ftp"))
                    else {"type": "image_url", "image_url": {"url": p if isinstance(p, str) else data_url(p)}}
                    for p in parts]}]
                return httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                                  json={"messages": msgs, "max_tokens": 2})
            p1 = "messages.0.content.1.image_url"
            _error(chat("a", "data:image/png;base64,iVBOR%%%"), 400, p1, "not valid base64")
            _error(chat("a", "data:image/png;base64," + base64.b64encode(b"not an image").decode()),
                   400, p1, "not an image")
            _error(chat("a", "ftp://127.0.0.1/x.png"), 400, p1, "unsupported URL scheme 'ftp'")
            _error(chat("a", "http://example.com/x.png"), 400, p1, "not in --allowed-media-domains")
            _error(chat("a", "file:///etc/passwd"), 400, p1, "outside --allowed-local-media-path")
            _error(chat("a", img, img, img), 400, "messages", "--limit-mm-per-prompt allows 2")
            from PIL import Image
            flat = Image.new("RGB", (200, 150), (10, 200, 30))  # a few hundred bytes, 30000 pixels
            _error(chat("a", flat), 400, p1, "over --max-image-pixels")
            big = random_image(140, 140, 5)  # ~59 KB of PNG noise, under the pixel limit
            r = chat("a", big)
            assert r.status_code == 413 and r.json()["error"]["param"] == p1, r.text
            assert "over --max-image-bytes" in r.json()["error"]["message"]
            _error(chat("a", silent), 400, p1, "timed out after 1 s")
            assert silent in chat("a", silent).json()["error"]["message"]
            _error(chat(raw=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                   400, "messages.0.content.0.image_url.url", "Field required")
            # the engine kept serving: good images from a data URL and a local file
            ok = chat("describe", img, f"file://{tmp_path}/ok.png")
            assert ok.status_code == 200, ok.text
            assert ok.json()["usage"]["completion_tokens"] == 2


def test_image_parts_to_a_text_only_model(tiny_llama_dir):
    with PagodaServer([tiny_llama_dir, *SERVE]) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={"max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"},
                                         {"type": "image_url", "image_url": {"url": data_url(random_image(8, 8, 1))}}]}]})
        _error(r, 400, "messages.0.content.1", "text-only")
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert card.get("capabilities") is None
        assert httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={
            "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).status_code == 200


LMDEPLOY = ["--backend", "turbomind", "--max-concurrent-requests", "64", "--disable-fastapi-docs",
            "--log-level", "ERROR", "--session-len", "512", "--max-batch-size", "32",
            "--cache-max-entry-count", "0.2", "--cache-block-seq-len", "64", "--max-prefill-token-num", "128",
            "--quant-policy", "4", "--vision-max-batch-size", "32"]


def test_lmdeploy_command_line(tiny_qwen2_vl_dir):
    """The guide's `lmdeploy serve` line, --quant-policy 4 (an int4 KV cache) included, starts
    and classifies an image."""
    with PagodaServer([tiny_qwen2_vl_dir, *LMDEPLOY]) as srv:
        client = srv.openai_client()
        r = client.chat.completions.create(model=tiny_qwen2_vl_dir, max_tokens=3, temperature=0, messages=user(
            "What is in this image? Answer with one word.", random_image(64, 64, 9)))
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
        assert httpx.get(srv.url + "/docs").status_code == 404  # --disable-fastapi-docs


def test_backend_flag_is_logged_and_ignored(tiny_qwen2_vl_dir, caplog):
    with caplog.at_level("WARNING", logger="pagoda.engine"):
        llm = LLM(tiny_qwen2_vl_dir, max_model_len=256, num_gpu_blocks_override=16, backend="turbomind")
    assert "--backend turbomind: LMDeploy's engine choice; pagoda has one engine" in caplog.text
    assert llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_flags_reach_the_engine():
    from pagoda.config import EngineArgs
    from pagoda.entrypoints.openai.cli_args import add_serve_args, resolve_args
    import argparse
    ns = resolve_args(add_serve_args(argparse.ArgumentParser()).parse_args(
        ["m", "--limit-mm-per-prompt", '{"image": 4}', "--mm-processor-kwargs", '{"max_pixels": 200704}',
         "--vision-max-batch-size", "32", "--backend", "pytorch", "--max-image-bytes", "1MiB"]))
    ea = EngineArgs.from_cli_args(ns)
    assert ea.limit_mm_per_prompt == {"image": 4} and ea.mm_processor_kwargs == {"max_pixels": 200704}
    assert (ea.vision_max_batch_size, ea.backend, ea.max_image_bytes) == (32, "pytorch", 1 << 20)
    for bad, msg in ((["--limit-mm-per-prompt", "{image: 4}"], "not valid JSON"),
                     (["--limit-mm-per-prompt", '{"audio": 1}'], "unknown modality 'audio'"),
                     (["--vision-max-batch-size", "0"], "--vision-max-batch-size: must be >= 1"),
                     (["--backend", "vllm"], "invalid choice")):
        r = subprocess.run([sys.executable, "-m", "pagoda.entrypoints.cli", "serve", "m", *bad],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_tensor_parallel_is_refused_for_vision_models(tiny_qwen2_vl_dir):
    from test_tensor_parallel import free_ports
    with pytest.raises(Exception, match="--tensor-parallel-size: vision-language models run on one device"):
        LLM(tiny_qwen2_vl_dir, max_model_len=256, tensor_parallel_size=2, master_port=free_ports())


def test_pooling_runner_is_refused_for_vision_models(tiny_qwen2_vl_dir):
    with pytest.raises(ValueError, match="--runner/--convert: Qwen2VLForConditionalGeneration is a "
                                         "vision-language model; it only generates"):
        LLM(tiny_qwen2_vl_dir, max_model_len=256, runner="pooling")
