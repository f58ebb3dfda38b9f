"""GPU diagnostics: (A) fp32 torch vs Triton backend logprob agreement on a tiny model, with the
top-2 margin where greedy tokens diverge; (B) W1-style run on the Qwen3-0.6B shape with the
engine's per-step-kind timing and a torch profiler table of the hottest CUDA kernels."""
import random, sys, time, json
import torch

sys.path.insert(0, ".")
from pagoda import LLM, SamplingParams  # noqa: E402


def tiny_dir():
    """The fp32 test model of tests/test_gpu.py."""
    import tempfile
    sys.path.insert(0, "tests")
    from test_gpu import build
    return build(tempfile.mkdtemp(), 0.08)


def part_a():
    d = tiny_dir()
    rng = random.Random(0)
    prompts = [[rng.randrange(4096) for _ in range(rng.choice([1, 15, 16, 17, 33, 100, 300]))] for _ in range(12)]
    res = {}
    for backend in ("torch", "triton"):
        llm = LLM(d, attention_backend=backend, enforce_eager=True, dtype="float32", skip_tokenizer_init=True,
                  max_model_len=1024, num_gpu_blocks_override=400)
        res[backend] = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                            logprobs=5), use_tqdm=False)
        del llm
    for i, (a, b) in enumerate(zip(res["torch"], res["triton"])):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        div = next((j for j in range(len(ta)) if ta[j] != tb[j]), None)
        lp0a, lp0b = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        d0 = max(abs(v.logprob - lp0b[k].logprob) for k, v in lp0a.items() if k in lp0b)
        info = ""
        if div is not None:
            lps = sorted((v.logprob for v in a.outputs[0].logprobs[div].values()), reverse=True)
            info = f"diverge@{div} torch-top2-margin={lps[0]-lps[1]:.2e}"
        print(f"prompt {i} len {len(prompts[i])}: first-step max|dlogprob|={d0:.2e} {info}")


def part_b():
    from pagoda.bench.shapes import write_model_dir
    d = write_model_dir("qwen3-0.6b")
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 151936 - 100) for _ in range(rng.randint(128, 1024))] for _ in range(512)]
    for seqs, toks in ((512, 16384), (384, 8192)):
        llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, max_model_len=2048,
                  max_num_seqs=seqs, max_num_batched_tokens=toks)
        torch.cuda.synchronize(); t = time.time()
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True), use_tqdm=False)
        torch.cuda.synchronize(); dt = time.time() - t
        print(f"W1 qwen3 max_num_seqs={seqs} tokens={toks}: {512*256/dt:.0f} out tok/s in {dt:.2f}s; "
              f"{json.dumps(llm.engine.step_timing)}")
        del llm; torch.cuda.empty_cache()
    llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, max_model_len=2048)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 151936 - 100) for _ in range(rng.randint(128, 1024))] for _ in range(512)]
    sp = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.engine.step_timing.clear()
    torch.cuda.synchronize(); t = time.time()
    llm.generate(prompts, sp, use_tqdm=False)
    torch.cuda.synchronize(); dt = time.time() - t
    print(f"W1 qwen3: {512*256/dt:.0f} out tok/s in {dt:.2f}s; step timing {json.dumps(llm.engine.step_timing)}")
    print("blocks", llm.engine.block_manager.num_blocks, "max_num_seqs", llm.engine.max_num_seqs)
    from torch.profiler import profile, ProfilerActivity
    eng = llm.engine
    for i, p in enumerate(prompts[:256]):
        eng.add_request(f"p{i}", p, sp)
    for _ in range(30):  # admit and prefill everyone
        eng.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            eng.step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    t = time.time()
    for _ in range(20):
        eng.step()
    print(f"decode step at batch {len(eng.scheduler.running)}: {(time.time()-t)/20*1e3:.2f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        # a mixed step: add 4 new prompts
        for i, p in enumerate(prompts[256:260]):
            eng.add_request(f"q{i}", p, sp)
        for _ in range(3):
            eng.step()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    part_a()
    part_b()
