"""`pagoda serve` on the GPU machine answers an openai-SDK chat request: the bundled SmolLM2
GGUF, then a random-weight Qwen3-0.6B-shaped model (with the SmolLM2 tokenizer, whose ids all
fall inside Qwen3's vocabulary; its text is noise, the point is the serving path)."""
import glob, os, subprocess, sys, time

import httpx
from openai import OpenAI

GGUF = sys.argv[1] if len(sys.argv) > 1 else "/tmp/smollm2.gguf"


def serve(args, port):
    p = subprocess.Popen([sys.executable, "-m", "pagoda.entrypoints.cli", "serve", *args, "--host", "127.0.0.1",
                          "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while time.time() - t0 < 240:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        if p.poll() is not None:
            print(p.stdout.read()[-3000:]); raise SystemExit("server died")
        time.sleep(1)
    p.kill(); print(p.stdout.read()[-3000:]); raise SystemExit("server did not come up")


def ask(port, model, **kw):
    c = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    t = time.time()
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                  temperature=0, max_tokens=32, **kw)
    print(f"[{model}] {time.time()-t:.2f}s finish={r.choices[0].finish_reason} usage={r.usage.prompt_tokens}+"
          f"{r.usage.completion_tokens}: {r.choices[0].message.content!r}")
    chunks = list(c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count to five."}],
                                            temperature=0, max_tokens=24, stream=True))
    print(f"[{model}] streamed {len(chunks)} chunks: {''.join(ch.choices[0].delta.content or '' for ch in chunks if ch.choices)!r}")
    return r


p = serve([GGUF, "--max-model-len", "2048"], 8011)
try:
    r = ask(8011, OpenAI(base_url="http://127.0.0.1:8011/v1", api_key="none").models.list().data[0].id)
    print("SMOLLM2 OK" if "Paris" in r.choices[0].message.content else "SMOLLM2 NO PARIS")
finally:
    p.terminate(); p.wait(30)
tok = glob.glob("/tmp/pagoda-cache/gguf/*")[0]
from pagoda.bench.shapes import write_model_dir  # noqa: E402
d = write_model_dir("qwen3-0.6b")
p = serve([d, "--load-format", "dummy", "--tokenizer", tok, "--max-model-len", "2048",
           "--served-model-name", "qwen3-0.6b-shape"], 8012)
try:
    r = ask(8012, "qwen3-0.6b-shape")
    print("QWEN3 SHAPE OK" if r.usage.completion_tokens > 0 else "QWEN3 SHAPE EMPTY")
finally:
    p.terminate(); p.wait(30)
