"""W1 on the Qwen3-0.6B shape, pagoda only: overlapped vs step-by-step decode, and where a decode
step's time goes at batch 256 (host work per step vs time the host waits for the GPU)."""
import json, random, sys, time
import torch

sys.path.insert(0, ".")
from pagoda import LLM, SamplingParams  # noqa: E402
from pagoda.bench.shapes import write_model_dir  # noqa: E402

shape = sys.argv[1] if len(sys.argv) > 1 else "qwen3-0.6b"
extra = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
quick = "quick" in sys.argv[3:]  # only the overlapped W1 run
d = write_model_dir(shape)
llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, max_model_len=2048, **extra)
eng = llm.llm_engine
core = eng.core
vocab = eng.model_config.vocab_size
rng = random.Random(0)
prompts = [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(128, 1024))] for _ in range(512)]
sp = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
llm.generate([p[::-1] for p in prompts[:8]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
             use_tqdm=False)
# the overlapped run only: a second W1 run in this process would reuse the first's prefix cache
for overlap in (True,):
    core.overlap = overlap
    core.step_timing.clear()
    torch.cuda.synchronize(); t = time.perf_counter()
    llm.generate(prompts, sp, use_tqdm=False)
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    print(f"W1 {shape} {extra} overlap={overlap}: {512 * 256 / dt:.0f} out tok/s in {dt:.2f}s; "
          f"steps {json.dumps({k: [v[0], round(v[1], 2)] for k, v in core.step_timing.items()})}")

if quick:
    sys.exit(0)
# decode steps at batch 256: time per step, and how much of it the host spends waiting on the GPU
from pagoda.worker import model_runner as mr  # noqa: E402
waited = [0.0]
orig = mr.PendingStep.result
def timed(self):
    t = time.perf_counter()
    try:
        return orig(self)
    finally:
        waited[0] += time.perf_counter() - t
mr.PendingStep.result = timed
for overlap in (True, False):
    core.overlap = overlap
    for i, p in enumerate(prompts[:256]):
        eng.add_request(f"{overlap}-{i}", p, sp)
    sched = core.scheduler
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running) or sched.waiting:
        eng.step()
    for _ in range(5):
        eng.step()
    torch.cuda.synchronize()
    waited[0] = 0.0
    t = time.perf_counter()
    for _ in range(40):
        eng.step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 40
    print(f"decode step at batch {len(sched.running)} overlap={overlap}: {dt * 1e3:.2f} ms, "
          f"host waiting for the GPU {waited[0] / 40 * 1e3:.2f} ms, host busy {(dt - waited[0] / 40) * 1e3:.2f} ms")
    for rid in list(eng.output_processor.parents):
        eng.abort_request(rid)
    eng.step()
