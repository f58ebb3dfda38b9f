"""W1 with half the requests under a JSON schema vs unconstrained W1, in one process (issue 14).

One engine, the W1 prompts (512 random-id prompts of 128-1024 tokens, 256 greedy tokens out, EOS
ignored), three timed runs in this order:
  free        every request unconstrained (the W1 figure)
  half-json   the same requests, every other one under SCHEMA: an array of at least 200 typed
              objects, so a constrained request stays inside the grammar for all its 256 tokens
              (the bitmask is filled and applied at every one of its steps)
  free-sync   unconstrained again with overlapped steps off: what a step-by-step engine would cost,
              for context (constrained requests keep overlapped steps on)
The figure is half-json / free (target >= 0.8). Every constrained output is then checked to be a
prefix the grammar accepts (a fresh xgrammar matcher takes all its tokens).

Random-weight shapes have no tokenizer; grammars compile against --tokenizer (a tokenizer
directory or a .gguf, default: the bundled SmolLM2's). Its vocabulary is smaller than Qwen3's
151,936 ids, which xgrammar pads; the bitmask is still the model's full width.

    python benchmarks/w1_structured.py --model-shape qwen3-0.6b --max-model-len 2048 \
        --tokenizer .whl/smollm2-tokenizer --output-json benchmarks/results/w1_structured_qwen3-0.6b.json

(`benchmarks/gpu_structured.sh` runs it in one device call; its `prepare` writes that directory.)

Runs on the CPU too (`--model-shape tiny-llama --num-prompts 16 --output-len 32`) as a smoke test.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ITEM = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 999999},
    "name": {"type": "string", "maxLength": 12},
    "ok": {"type": "boolean"},
    "kind": {"enum": ["alpha", "beta", "gamma"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
    "required": ["id", "name", "ok", "kind", "tags"]}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 200}


def instrument(core) -> dict:
    """Counters of the host's structured-outputs work, read per timed run: seconds in the
    matchers' accept and in the bitmask fill (both on the step's critical path), and Triton
    compiles (a kernel compiled mid-run costs seconds)."""
    acc = {"accept_s": 0.0, "fill_s": 0.0, "triton_compiles": 0}
    so = core.structured_output
    for name, key in (("accept_tokens", "accept_s"), ("fill", "fill_s")):
        real = getattr(so, name)

        def timed(*a, _real=real, _key=key):
            t0 = time.perf_counter()
            try:
                return _real(*a)
            finally:
                acc[_key] += time.perf_counter() - t0
        setattr(so, name, timed)
    try:
        from triton.runtime import jit
    except ImportError:
        return acc
    real_compile = jit.JITFunction._do_compile

    def counting(self, *a, **k):
        acc["triton_compiles"] += 1
        return real_compile(self, *a, **k)
    jit.JITFunction._do_compile = counting
    return acc


def tokenizer_dir(path: str | None) -> str:
    from pagoda.worker import loader
    if path is None:
        path = loader.bundled_model_path()
    return loader._gguf_side_dir(path) if path.endswith(".gguf") else path  # noqa: SLF001


def main(argv=None) -> int:
    from pagoda.bench import model_target, workloads
    from pagoda.bench.args import add_common_args
    from pagoda.bench.hf_backend import sync
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = add_common_args(p)
    g.add_argument("--num-prompts", type=int, default=512)
    g.add_argument("--input-len-range", type=int, nargs=2, default=[128, 1024])
    g.add_argument("--output-len", type=int, default=256)
    g.add_argument("--skip-sync-run", action="store_true", help="Do not run the free-sync context run.")
    args = p.parse_args(argv)
    if args.model_shape is None and args.model is None:
        args.model_shape = "qwen3-0.6b"
    args.tokenizer = tokenizer_dir(args.tokenizer)
    target = model_target.from_args(args)
    prompts = workloads.random_token_prompts(args.num_prompts, *args.input_len_range,
                                             model_target.vocab_size(target), args.seed)

    from pagoda import LLM, SamplingParams
    from pagoda.sampling_params import StructuredOutputsParams
    llm = LLM(**target.engine_kwargs)
    core = llm.llm_engine.core
    n_out = args.output_len
    free = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True)
    constrained = free.clone(structured_outputs=StructuredOutputsParams(json=SCHEMA))
    half = [constrained if i % 2 == 0 else free for i in range(len(prompts))]
    progress = not args.disable_tqdm
    # warm-up: reversed prompts (no prefix-cache reuse later), the grammar compiled once here
    llm.generate([q[::-1] for q in prompts[:8]], [constrained, free] * 4, use_tqdm=False)
    counters = instrument(core)

    def timed(name, params, overlap):
        core.overlap = overlap
        core.step_timing.clear()
        for k in counters:
            counters[k] = type(counters[k])()
        core.kv_cache_manager.reset_prefix_cache()  # each run prefills its prompts itself
        sync(target.device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=progress)
        sync(target.device)
        dt = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        steps = {k: v[0] for k, v in core.step_timing.items()}
        host = dict(counters)
        print(f"{name:10s} {dt:8.2f} s {tokens / dt:10.1f} out tok/s  ({tokens} tokens, steps {steps}; "
              f"accept {host['accept_s']:.2f} s, fill {host['fill_s']:.2f} s, "
              f"{host['triton_compiles']} Triton compiles)", flush=True)
        return {"name": name, "seconds": dt, "output_tokens": tokens, "output_tok_s": tokens / dt,
                "overlap": overlap, "steps": steps, **host}, outs

    overlap = core.overlap
    runs = []
    r, _ = timed("free", [free] * len(prompts), overlap)
    runs.append(r)
    r, outs = timed("half-json", half, overlap)
    runs.append(r)
    if not args.skip_sync_run:
        runs.append(timed("free-sync", [free] * len(prompts), False)[0])
    core.overlap = overlap
    expected = n_out * len(prompts)
    ok = all(r["output_tokens"] == expected for r in runs)

    # every constrained output is a prefix of the grammar's language
    import xgrammar as xgr
    from pagoda.structured_output.grammar import build_grammar
    manager = core.structured_output
    compiled = manager._get_backend().compiler.compile_grammar(  # noqa: SLF001
        build_grammar(constrained.structured_outputs))
    valid = 0
    for o in outs[0::2]:
        m = xgr.GrammarMatcher(compiled)
        valid += all(m.accept_token(t) for t in o.outputs[0].token_ids)
    ratio = runs[1]["output_tok_s"] / runs[0]["output_tok_s"]
    print(f"half-json / free = {ratio:.3f} (target >= 0.8); constrained outputs inside the grammar: "
          f"{valid}/{len(outs[0::2])}; tokens counted {'ok' if ok else 'MISMATCH'}")
    result = {"workload": "W1, half under a JSON schema", "target": target.label, "device": target.device,
              "num_prompts": len(prompts), "output_len": n_out, "tokenizer": args.tokenizer,
              "schema": SCHEMA, "runs": runs, "ratio": ratio, "valid_constrained": valid,
              "num_constrained": len(outs[0::2]), "tokens_ok": ok}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    del llm
    gc.collect()
    return 0 if ok and valid == len(outs[0::2]) else 1


if __name__ == "__main__":
    sys.exit(main())
