"""Image inputs: data/http(s)/file URLs through the media connector (limits, SSRF checks,
redirects, timeouts), the offline API (LLM.generate with multi_modal_data, LLM.chat with
image_url parts), placeholder expansion of token-id prompts, chat templates with image parts,
and the errors for images a model or a server does not take."""
from __future__ import annotations

import asyncio
import base64
import http.server
import io
import os
import socket
import threading
import time

import pytest

from pagoda import LLM, SamplingParams
from pagoda.inputs.chat_template import image_urls, render_chat
from pagoda.inputs.media import MediaConnector, MediaError
from vlm_utils import PLACEHOLDER, hf_greedy, hf_inputs, hf_model, random_image

SP = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


# ------------------------------------------------------------------------- a local web server

class _Handler(http.server.BaseHTTPRequestHandler):
    image = b""

    def log_message(self, *a):
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/img.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.image)))
            self.end_headers()
            self.wfile.write(self.image)
        elif self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.end_headers()
        elif self.path == "/slow.png":
            time.sleep(3)
            self.send_response(200)
            self.end_headers()
        elif self.path == "/chunked.png":  # no Content-Length: the limit applies while reading
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\x89PNG" + b"x" * 300_000)
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="module")
def web():
    _Handler.image = png_bytes(random_image(40, 30, 3))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def _fetch(conn: MediaConnector, url: str) -> bytes:
    return asyncio.run(conn.fetch(url))


def test_data_urls():
    conn = MediaConnector(max_bytes=100_000, max_pixels=10_000)
    img = random_image(50, 40, 1)
    got = conn.decode(_fetch(conn, data_url(img)))
    assert got.size == (50, 40) and got.tobytes() == img.tobytes()
    with pytest.raises(MediaError, match="not valid base64") as e:
        _fetch(conn, "data:image/png;base64,iVBOR!!w0K")
    assert e.value.status == 400
    with pytest.raises(MediaError, match="not an image"):
        conn.decode(_fetch(conn, "data:image/png;base64," + base64.b64encode(b"hello world").decode()))
    with pytest.raises(MediaError, match="over --max-image-bytes") as e:
        _fetch(conn, "data:image/png;base64," + base64.b64encode(b"x" * 200_000).decode())
    assert e.value.status == 413
    with pytest.raises(MediaError, match="over --max-image-pixels"):
        conn.decode(png_bytes(random_image(200, 100, 2)))
    with pytest.raises(MediaError, match="only base64"):
        _fetch(conn, "data:image/png,rawdata")
    for url in ("ftp://example.com/a.png", "gopher://x/y", "/etc/passwd", "javascript:alert(1)"):
        with pytest.raises(MediaError, match="unsupported URL scheme"):
            _fetch(conn, url)


def test_http_fetch_is_ssrf_safe(web):
    open_conn = MediaConnector(timeout=1)
    # loopback refused unless the host is listed
    with pytest.raises(MediaError, match="loopback address"):
        _fetch(open_conn, web + "/img.png")
    with pytest.raises(MediaError, match="not in --allowed-media-domains"):
        _fetch(MediaConnector(allowed_media_domains=["example.com"]), web + "/img.png")
    conn = MediaConnector(allowed_media_domains=["127.0.0.1"], timeout=1, max_bytes=100_000)
    assert _fetch(conn, web + "/img.png") == _Handler.image
    # redirects: followed on allowed http, refused to another scheme or to an unlisted host
    assert _fetch(conn, web + "/redirect?to=/img.png") == _Handler.image
    with pytest.raises(MediaError, match="unsupported scheme 'file'"):
        _fetch(conn, web + "/redirect?to=file:///etc/passwd")
    with pytest.raises(MediaError, match="'localhost' is not in --allowed-media-domains"):
        _fetch(conn, web + "/redirect?to=" + web.replace("127.0.0.1", "localhost") + "/img.png")
    with pytest.raises(MediaError, match="HTTP 404"):
        _fetch(conn, web + "/missing.png")
    with pytest.raises(MediaError, match="timed out after 1 s") as e:
        _fetch(conn, web + "/slow.png")
    assert "/slow.png" in str(e.value)
    with pytest.raises(MediaError, match="over --max-image-bytes") as e:
        _fetch(conn, web + "/chunked.png")
    assert e.value.status == 413
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MediaError, match="cannot fetch"):
        _fetch(conn, f"http://127.0.0.1:{port}/img.png")


def test_private_addresses_are_refused():
    conn = MediaConnector(timeout=1)
    for url, kind in (("http://10.1.2.3/x.png", "private"), ("http://169.254.169.254/latest", "link-local"),
                      ("http://[::1]/x.png", "loopback"), ("http://0.0.0.0/x.png", "unspecified"),
                      ("http://[::ffff:127.0.0.1]/x.png", "loopback")):
        with pytest.raises(MediaError, match=f"{kind} address"):
            _fetch(conn, url)


def test_local_files(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    img = random_image(20, 20, 4)
    (root / "a b.png").write_bytes(png_bytes(img))
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes(img))
    (root / "link.png").symlink_to(outside)
    conn = MediaConnector(allowed_local_media_path=str(root))
    assert conn.decode(_fetch(conn, f"file://{root}/a%20b.png")).size == (20, 20)
    for url in (f"file://{outside}", f"file://{root}/../secret.png", f"file://{root}/link.png"):
        with pytest.raises(MediaError, match="outside --allowed-local-media-path"):
            _fetch(conn, url)
    with pytest.raises(MediaError, match="local files are not allowed"):
        _fetch(MediaConnector(), f"file://{root}/a%20b.png")
    with pytest.raises(MediaError, match="cannot read"):
        _fetch(conn, f"file://{root}/missing.png")


# ------------------------------------------------------------------------------ chat templates

def test_chat_template_gets_image_parts(tiny_qwen2_vl_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_qwen2_vl_dir)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "image_url", "image_url": {"url": "data:x"}},
                                         {"type": "image_url", "image_url": "data:y"},
                                         {"type": "text", "text": "b"}]}]
    text = render_chat(tok, msgs, multimodal=True)
    ref = tok.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image"}, {"type": "image"}, {"type": "text", "text": "b"}]}],
        tokenize=False, add_generation_prompt=True)
    assert text == ref and text.count("<|image_pad|>") == 2
    assert image_urls(msgs) == [("messages.0.content.1.image_url", "data:x"),
                                ("messages.0.content.2.image_url", "data:y")]
    with pytest.raises(ValueError, match="text-only"):
        render_chat(tok, msgs)


# ------------------------------------------------------------------------------- offline API

def test_llm_chat_with_data_and_file_urls(tiny_llava_dir, tmp_path):
    path = tiny_llava_dir
    (tmp_path / "pic.png").write_bytes(png_bytes(random_image(30, 44, 5)))
    llm = LLM(path, max_model_len=512, num_gpu_blocks_override=64, allowed_local_media_path=str(tmp_path))
    a, b = random_image(64, 40, 6), random_image(30, 44, 5)
    conv = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(a)}},
                                         {"type": "text", "text": "and"},
                                         {"type": "image_url", "image_url": {"url": f"file://{tmp_path}/pic.png"}},
                                         {"type": "text", "text": "what differs?"}]}]
    out = llm.chat(conv, SP, use_tqdm=False)[0]
    toks, _ = hf_greedy(hf_model(path), hf_inputs("llava", path, out.prompt_token_ids, [a, b]), 6)
    assert out.outputs[0].token_ids == toks
    # the same conversation as a plain prompt with multi_modal_data
    from transformers import AutoTokenizer
    text = AutoTokenizer.from_pretrained(path).apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                      {"type": "text", "text": "what differs?"}]}],
        tokenize=False, add_generation_prompt=True)
    gen = llm.generate({"prompt": text, "multi_modal_data": {"image": [a, b]}}, SP, use_tqdm=False)[0]
    assert gen.outputs[0].token_ids == toks
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}]}]
    with pytest.raises(MediaError, match="outside --allowed-local-media-path"):
        llm.chat(bad, SP, use_tqdm=False)


@pytest.mark.parametrize("kind", ["llava", "idefics3", "qwen2_vl"])
def test_token_id_prompts_expand_one_placeholder_per_image(kind, request):
    path = request.getfixturevalue(f"tiny_{kind}_dir")
    llm = LLM(path, max_model_len=512, num_gpu_blocks_override=64)
    ph = PLACEHOLDER[kind]
    text = f"Look{ph}, then{ph}: go"
    imgs = [random_image(50, 30, 11), random_image(28, 56, 12)]
    by_text = llm.generate({"prompt": text, "multi_modal_data": {"image": imgs}}, SP, use_tqdm=False)[0]
    ids = llm.get_tokenizer()(text).input_ids
    by_ids = llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": imgs}}, SP, use_tqdm=False)[0]
    assert by_ids.prompt_token_ids == by_text.prompt_token_ids
    assert by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids
    # already expanded ids are taken as they are
    again = llm.generate({"prompt_token_ids": by_text.prompt_token_ids, "multi_modal_data": {"image": imgs}},
                         SP, use_tqdm=False)[0]
    assert again.outputs[0].token_ids == by_text.outputs[0].token_ids
    with pytest.raises(ValueError, match="image token"):
        llm.generate({"prompt_token_ids": ids[:3], "multi_modal_data": {"image": imgs}}, SP, use_tqdm=False)


def test_offline_bad_inputs(tiny_qwen2_vl_dir, tiny_llm):
    llm = LLM(tiny_qwen2_vl_dir, max_model_len=512, num_gpu_blocks_override=64,
              limit_mm_per_prompt={"image": 1}, max_image_pixels=5000)
    ph = PLACEHOLDER["qwen2_vl"]
    img = random_image(40, 40, 1)
    with pytest.raises(ValueError, match="--limit-mm-per-prompt allows 1"):
        llm.generate({"prompt": ph * 2, "multi_modal_data": {"image": [img, img]}}, SP, use_tqdm=False)
    with pytest.raises(ValueError, match="over|exceeds --max-image-pixels"):
        llm.generate({"prompt": ph, "multi_modal_data": {"image": random_image(100, 60, 2)}}, SP, use_tqdm=False)
    with pytest.raises(ValueError, match="2 image placeholder.*for 1 image"):
        llm.generate({"prompt": ph * 2, "multi_modal_data": {"image": [img]}}, SP, use_tqdm=False)
    with pytest.raises(ValueError, match="PIL images"):
        llm.generate({"prompt": ph, "multi_modal_data": {"image": "cat.png"}}, SP, use_tqdm=False)
    with pytest.raises(ValueError, match="unsupported modality 'video'"):
        llm.generate({"prompt": ph, "multi_modal_data": {"video": [img]}}, SP, use_tqdm=False)
    # the engine keeps serving
    assert llm.generate({"prompt": f"ok {ph}", "multi_modal_data": {"image": img}}, SP, use_tqdm=False)
    # a text-only model takes no images
    with pytest.raises(ValueError, match="text-only model"):
        tiny_llm.generate({"prompt": "<image>", "multi_modal_data": {"image": img}}, SP, use_tqdm=False)
    with pytest.raises(ValueError, match="text-only"):
        tiny_llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
                      SP, use_tqdm=False)


def test_max_pixels_kwarg_shrinks_images(tiny_qwen2_vl_dir):
    """--mm-processor-kwargs reach the image processor: Qwen2-VL's max_pixels caps the grid."""
    img = random_image(112, 112, 13)
    ph = PLACEHOLDER["qwen2_vl"]
    big = LLM(tiny_qwen2_vl_dir, max_model_len=512, num_gpu_blocks_override=64)
    small = LLM(tiny_qwen2_vl_dir, max_model_len=512, num_gpu_blocks_override=64,
                mm_processor_kwargs={"max_pixels": 56 * 56})
    p = {"prompt": f"x {ph}", "multi_modal_data": {"image": img}}
    n_big = len(big.generate(p, SP, use_tqdm=False)[0].prompt_token_ids)
    n_small = len(small.generate(p, SP, use_tqdm=False)[0].prompt_token_ids)
    assert n_big - n_small == 16 - 4  # 4x4 merged tokens, 2x2 with the cap
    assert os.path.exists(os.path.join(tiny_qwen2_vl_dir, "preprocessor_config.json"))


@pytest.mark.parametrize("kind", ["llava", "idefics3", "qwen2_vl"])
def test_images_processed_in_one_call_equal_one_by_one(kind, request):
    """process_images runs the processor once over a list; each image's outputs must be what
    it gets alone (the encoder and prefix caches key on them)."""
    llm = LLM(request.getfixturevalue(f"tiny_{kind}_dir"), max_model_len=512, num_gpu_blocks_override=64)
    mm = llm.llm_engine.processor.mm_processor
    imgs = [random_image(50, 30, 21), random_image(28, 56, 22), random_image(64, 64, 23)]
    together = mm.process_images(imgs)
    assert len(together) == 3
    for img, item in zip(imgs, together):
        (alone,) = mm.process_images([img])
        assert (item.num_embeds, item.replacement, item.identifier) == \
            (alone.num_embeds, alone.replacement, alone.identifier)
        assert sorted(item.data) == sorted(alone.data)
        for key in alone.data:
            assert item.data[key].shape == alone.data[key].shape, key
            assert (item.data[key] == alone.data[key]).all(), key
    assert len({it.identifier for it in together}) == 3


def test_offline_image_batch_runs_while_images_are_processed(tiny_qwen2_vl_dir):
    """40 image prompts (more than one chunk of the processor pool) give each prompt's tokens
    alone; a bad prompt late in the batch fails the whole call and leaves nothing running."""
    llm = LLM(tiny_qwen2_vl_dir, max_model_len=512, num_gpu_blocks_override=256)
    ph = PLACEHOLDER["qwen2_vl"]
    prompts = [{"prompt": f"n{i} {ph}", "multi_modal_data": {"image": random_image(28 + 4 * (i % 5), 28, i)}}
               for i in range(40)]
    batch = llm.generate(prompts, SP, use_tqdm=False)
    for i in (0, 17, 39):
        alone = llm.generate(prompts[i], SP, use_tqdm=False)[0]
        assert batch[i].prompt_token_ids == alone.prompt_token_ids
        assert batch[i].outputs[0].token_ids == alone.outputs[0].token_ids
    bad = list(prompts)
    bad[35] = {"prompt": ph * 2, "multi_modal_data": {"image": random_image(28, 28, 99)}}
    with pytest.raises(ValueError, match="2 image placeholder"):
        llm.generate(bad, SP, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate(prompts[3], SP, use_tqdm=False)[0].outputs[0].token_ids == batch[3].outputs[0].token_ids
