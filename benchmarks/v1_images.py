"""V1 (../shared/bench/README.md): image classification with a Qwen2.5-VL-3B-shape model of
random bf16 weights, in one call, on one GPU.

    python benchmarks/v1_images.py [--num-images 512] [--vision-max-batch-size 32] \
        [--out benchmarks/results/v1.json] [--skip hf,offline,serve] [-- extra pagoda serve flags]

512 RGB images of 448x448 (pixels from numpy.random.default_rng(0)), each with the user text
"What is in this image? Answer with one word." in Qwen2.5-VL's chat template (its default
system turn), 8 tokens out, greedy, EOS ignored. A 448x448 image is 1,024 patches, 256 image
tokens; the prompt is ~280 tokens.

1. hf: transformers `generate`, batches of 64, the image processor included in the time;
2. offline: `LLM.generate` with the PIL images (preprocessing included);
3. serve: `pagoda serve` on the same model, all requests at once to /v1/chat/completions with
   the image as a base64 PNG data: URL in an image_url part (the client encodes the PNGs
   before the clock starts).
Each runs in a process of its own (the GPU is free for the next). Prints images/s of each,
offline / hf and serve / offline; exits 1 if a request failed or returned a wrong token count.

No tokenizer of Qwen's exists offline: the model directory gets a word-level tokenizer whose
special tokens sit at Qwen's ids (<|im_start|> 151644, <|vision_start|> 151652, <|image_pad|>
151655, ...), so prompts have the real layout and length.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # this checkout's pagoda, as `python -m pagoda...` from ROOT gets
QUESTION = "What is in this image? Answer with one word."
OUT_LEN = 8
SIDE = 448

SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
            "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
            "<|image_pad|>": 151655, "<|video_pad|>": 151656}
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def qwen25_vl_3b_config(shape: str = "3b"):
    """Qwen2.5-VL-3B-Instruct's shape; "tiny": the same layout, small (a CPU smoke run)."""
    from transformers import Qwen2_5_VLConfig
    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", tokens_per_second=2)
    if shape == "tiny":
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_parameters=dict(text["rope_parameters"], mrope_section=[2, 3, 3]))
        vision.update(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                      fullatt_block_indexes=[1, 3])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                           image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                           vision_end_token_id=151653)
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


def write_model_dir(path: str, shape: str) -> str:
    """config.json, preprocessor_config.json (max 448x448 pixels), tokenizer, chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    cfg = qwen25_vl_3b_config(shape)
    cfg.save_pretrained(path)
    # Qwen2-VL's image processor settings (either backend reads them), at most 448x448 pixels
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "Qwen2VLImageProcessor", "do_resize": True, "resample": 3,
                   "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711], "patch_size": 14,
                   "temporal_patch_size": 2, "merge_size": 2,
                   "size": {"shortest_edge": 56 * 56, "longest_edge": SIDE * SIDE}}, f, indent=2)
    words = ["[UNK]", "You", "are", "a", "helpful", "assistant", "user", "system", ".", "?", ","] + \
        QUESTION.replace("?", " ").replace(".", " ").split()
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    for i in range(len(vocab), 151936):  # fillers up to Qwen's vocabulary, specials at their ids
        vocab.setdefault(f"<w{i}>", i)
    for tok, i in SPECIALS.items():
        vocab.pop(next(k for k, v in vocab.items() if v == i))
        vocab[tok] = i
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=list(SPECIALS))
    tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(path)
    return path


def images(n: int, seed: int = 0):
    """V1's images (seed 0); warm-up runs take others, so the timed run meets no cached image."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)) for _ in range(n)]


def chat_text(model_dir: str) -> str:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
                                   tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------- the runs

def run_hf(model_dir: str, n: int, batch: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    cfg = AutoConfig.from_pretrained(model_dir)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForImageTextToText.from_config(
            cfg, dtype=torch.bfloat16 if dev == "cuda" else torch.float32, attn_implementation="sdpa")
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    ip = AutoImageProcessor.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = chat_text(model_dir).replace("<|image_pad|>", "<|image_pad|>" * (SIDE // 28) ** 2)
    ids = tok(text, add_special_tokens=False).input_ids
    imgs = images(n)
    batch = min(batch, n)
    gen = dict(max_new_tokens=OUT_LEN, min_new_tokens=OUT_LEN, do_sample=False, eos_token_id=None, pad_token_id=0)
    x = torch.tensor([ids] * batch, device=dev)
    with torch.no_grad():  # warm-up batch (not timed)
        px = ip(imgs[:batch], return_tensors="pt")
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=px["pixel_values"].to(dev),
                       image_grid_thw=px["image_grid_thw"].to(dev), mm_token_type_ids=(x == 151655).int(), **gen)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    pre = 0.0
    tokens = 0
    with torch.no_grad():
        for i in range(0, n, batch):
            chunk = imgs[i:i + batch]
            t = time.perf_counter()
            px = ip(chunk, return_tensors="pt")
            pre += time.perf_counter() - t
            x = torch.tensor([ids] * len(chunk), device=dev)
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                 pixel_values=px["pixel_values"].to(dev), image_grid_thw=px["image_grid_thw"].to(dev),
                                 mm_token_type_ids=(x == 151655).int(), **gen)
            tokens += (out.shape[1] - x.shape[1]) * len(chunk)
    sync()
    dt = time.perf_counter() - t0
    return {"backend": "hf", "images": n, "seconds": dt, "images_per_s": n / dt, "preprocess_s": pre,
            "tokens": tokens, "expected_tokens": n * OUT_LEN, "prompt_tokens": len(ids),
            "image_processor": type(ip).__name__}


def run_offline(model_dir: str, n: int, vision_batch: int) -> dict:
    from pagoda import LLM, SamplingParams
    llm = LLM(model_dir, load_format="dummy", max_model_len=2048, vision_max_batch_size=vision_batch)
    text = chat_text(model_dir)
    imgs = images(n)
    sp = SamplingParams(temperature=0, max_tokens=OUT_LEN, ignore_eos=True)
    llm.generate([{"prompt": text, "multi_modal_data": {"image": im}} for im in images(min(32, n), 1)], sp,
                 use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt": text, "multi_modal_data": {"image": im}} for im in imgs], sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    s = llm.llm_engine.core.scheduler.stats()
    return {"backend": "pagoda", "images": n, "seconds": dt, "images_per_s": n / dt, "tokens": tokens,
            "expected_tokens": n * OUT_LEN, "prompt_tokens": len(outs[0].prompt_token_ids),
            "images_encoded": s.images_encoded_total, "vision_max_batch_size": vision_batch,
            "step_timing": llm.llm_engine.core.step_timing}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _send_all(url: str, bodies: list[dict]) -> tuple[float, list]:
    import httpx
    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=len(bodies) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(b):
            r = await client.post(url + "/v1/chat/completions", json=b)
            return r.status_code, (r.json() if r.status_code == 200 else r.text)
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - t0, res


def run_serve(model_dir: str, n: int, vision_batch: int, extra: list[str], timeout: float) -> dict:
    import httpx
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="v1-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", model_dir, "--load-format", "dummy",
           "--max-model-len", "2048", "--vision-max-batch-size", str(vision_batch), "--port", str(port),
           "--disable-log-requests", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"pagoda serve exited {proc.returncode}: {open(log.name).read()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        else:
            raise RuntimeError("pagoda serve did not become healthy")
        urls = []
        for im in images(n):
            buf = io.BytesIO()
            im.save(buf, "PNG")
            urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())

        def body(u):
            return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}},
                                                              {"type": "text", "text": QUESTION}]}],
                    "max_tokens": OUT_LEN, "temperature": 0, "ignore_eos": True}
        warm = []
        for im in images(min(32, n), 1):
            buf = io.BytesIO()
            im.save(buf, "PNG")
            warm.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
        asyncio.run(_send_all(url, [body(u) for u in warm]))  # warm-up, other images
        dt, res = asyncio.run(_send_all(url, [body(u) for u in urls]))
        errors = [r for code, r in res if code != 200]
        tokens = sum(r["usage"]["completion_tokens"] for code, r in res if code == 200)
        prompt = next((r["usage"]["prompt_tokens"] for code, r in res if code == 200), 0)
        return {"backend": "pagoda-serve", "images": n, "seconds": dt, "images_per_s": n / dt,
                "tokens": tokens, "expected_tokens": n * OUT_LEN, "prompt_tokens": prompt,
                "errors": len(errors), "first_error": errors[0] if errors else None,
                "png_bytes_mean": sum(len(u) for u in urls) * 3 // 4 // n}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--shape", default="3b", choices=("3b", "tiny"),
                   help="tiny: a small model of the same layout (a smoke run, e.g. on a CPU)")
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--vision-max-batch-size", type=int, default=32)
    p.add_argument("--skip", default="", help="comma-separated runs to leave out: hf, offline, serve")
    p.add_argument("--out", default=None, help="write all figures here (JSON)")
    p.add_argument("--model-dir", default=None, help="reuse a directory written by an earlier call")
    p.add_argument("--serve-timeout", type=float, default=900)
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one run, in this process
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    if args.run:
        fn = {"hf": lambda: run_hf(args.model_dir, args.num_images, args.hf_batch_size),
              "offline": lambda: run_offline(args.model_dir, args.num_images, args.vision_max_batch_size)}[args.run]
        print("RESULT " + json.dumps(fn()))
        return 0
    model_dir = args.model_dir or write_model_dir(tempfile.mkdtemp(prefix=f"v1-qwen2.5-vl-{args.shape}-"),
                                                  args.shape)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results = {}

    def save():  # after every run: a call cut short still brings back what it measured
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    for run in ("hf", "offline"):
        if run in skip:
            continue
        r = subprocess.run([sys.executable, __file__, "--run", run, "--model-dir", model_dir,
                            "--num-images", str(args.num_images), "--hf-batch-size", str(args.hf_batch_size),
                            "--vision-max-batch-size", str(args.vision_max_batch_size)],
                           cwd=ROOT, capture_output=True, text=True)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if r.returncode or line is None:
            print(r.stdout[-3000:], r.stderr[-5000:], file=sys.stderr)
            return 1
        results[run] = json.loads(line[len("RESULT "):])
        print(f"  {run}: {results[run]['images_per_s']:.1f} images/s", flush=True)
        save()
    if "serve" not in skip:
        results["serve"] = run_serve(model_dir, args.num_images, args.vision_max_batch_size, extra,
                                     args.serve_timeout)
    ok = True
    print(f"V1: {args.num_images} images {SIDE}x{SIDE}, {OUT_LEN} tokens out, Qwen2.5-VL-{args.shape} shape "
          "(random weights)")
    for name, r in results.items():
        good = r["tokens"] == r["expected_tokens"] and not r.get("errors")
        ok &= good
        print(f"  {name:8s} {r['images_per_s']:8.1f} images/s  ({r['seconds']:.2f} s, prompt {r['prompt_tokens']} "
              f"tokens, tokens {r['tokens']}/{r['expected_tokens']}{'' if good else '  MISMATCH'})")
    if "hf" in results and "offline" in results:
        results["offline_over_hf"] = results["offline"]["images_per_s"] / results["hf"]["images_per_s"]
        print(f"  offline / hf    = {results['offline_over_hf']:.2f}x  (goal >= 6x)")
    if "offline" in results and "serve" in results:
        results["serve_over_offline"] = results["serve"]["images_per_s"] / results["offline"]["images_per_s"]
        print(f"  serve / offline = {results['serve_over_offline']:.2f}   (goal >= 0.85)")
    save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
