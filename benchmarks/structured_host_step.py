"""Host time of one structured-outputs step (issue 14): R constrained rows under W1's JSON schema
(benchmarks/w1_structured.py) in a B-row batch, through the engine core's own pieces:

  accept  the matchers take the step's sampled tokens (what Scheduler.update_from_output calls)
  fill    the next bitmask of the R rows (StructuredOutputManager.fill, xgrammar's batch matcher)
  apply   the bitmask applied to the R rows of CPU logits [B, V] (pagoda.sample.grammar_bitmask;
          on CUDA this is a kernel launch, so it is reported apart)

for each model vocabulary V (49,152: the SmolLM2 tokenizer's own; 151,936: Qwen3's, over which the
grammar's tokenizer is padded as on the H200 run). Tokens are the masked argmax of fresh random
logits each step, as a random-weight model's greedy choice (not timed). Medians over the steps
after a few warm-up steps.

    python benchmarks/structured_host_step.py --tokenizer .whl/smollm2-tokenizer
    python benchmarks/structured_host_step.py --compare /tmp/base   # A/B: a checkout of the code
                                                                      # before, runs interleaved
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(args) -> dict:
    import torch
    import xgrammar as xgr  # noqa: F401 - fail early without it
    from transformers import AutoTokenizer

    from pagoda.engine.scheduler_output import GrammarBitmask
    from pagoda.sample.grammar_bitmask import apply_token_bitmask
    from pagoda.sampling_params import StructuredOutputsParams
    from pagoda.structured_output.manager import StructuredOutputManager
    sys.path.insert(0, HERE)  # after pagoda's import: w1_structured puts this tree first on the path
    from w1_structured import SCHEMA, tokenizer_dir
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(args.tokenizer))
    torch.set_num_threads(args.torch_threads)
    out = {}
    for vocab in args.vocab:
        so = StructuredOutputManager(vocab, lambda: tok, max_threads=args.threads)
        ids = [f"c{i}" for i in range(args.rows)]
        batch = ids + [f"f{i}" for i in range(args.batch - args.rows)]   # constrained rows first
        for rid in ids:
            so.add_request(rid, StructuredOutputsParams(json=SCHEMA), [])
        while not all(so.is_ready(r) for r in ids):
            time.sleep(0.01)
        g = torch.Generator().manual_seed(0)
        times: dict[str, list[float]] = {"accept": [], "fill": [], "apply": []}
        for step in range(args.warmup + args.steps):
            logits = torch.randn(args.batch, vocab, generator=g)
            t0 = time.perf_counter()
            filled = so.fill(ids)
            t1 = time.perf_counter()
            grammar = GrammarBitmask(ids)
            if isinstance(filled, tuple):      # (bitmask, its requests) since the batched path
                grammar.bitmask, grammar.req_ids = filled
                grammar.vocab_size = so.grammar_vocab_size
            else:
                grammar.bitmask = filled
            apply_token_bitmask(logits, grammar, batch)
            t2 = time.perf_counter()
            toks = logits[:args.rows].argmax(-1).tolist()
            t3 = time.perf_counter()
            if hasattr(so, "accept_tokens"):
                so.accept_tokens(ids, toks)
            else:                              # the code before: one call a row
                for rid, t in zip(ids, toks):
                    so.accept(rid, t)
            t4 = time.perf_counter()
            if step >= args.warmup:
                times["fill"].append(t1 - t0)
                times["apply"].append(t2 - t1)
                times["accept"].append(t4 - t3)
        broken = sum(st.broken for st in so.requests.values())
        so.shutdown()
        res = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        res["accept+fill"] = res["accept"] + res["fill"]
        res["broken"] = broken
        out[str(vocab)] = res
    import pagoda
    print("pagoda from", os.path.dirname(os.path.dirname(pagoda.__file__)), file=sys.stderr)
    return out


def show(label: str, res: dict, rows: int) -> None:
    for vocab, r in res.items():
        print(f"{label:8s} V={vocab:>6s}  accept {r['accept']:8.0f} us  fill {r['fill']:8.0f} us  "
              f"accept+fill {r['accept+fill']:8.0f} us ({r['accept+fill'] / rows:5.1f} us/row)  "
              f"apply (CPU) {r['apply']:8.0f} us", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the bundled model's)")
    p.add_argument("--rows", type=int, default=256, help="constrained rows")
    p.add_argument("--batch", type=int, default=512, help="rows in the batch (the rest are free)")
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936], help="model vocabulary sizes")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="fill threads (default: the engine's)")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--compare", default=None, help="a checkout of the code before: A/B, interleaved")
    p.add_argument("--repeats", type=int, default=3, help="with --compare: runs of each side")
    p.add_argument("--json", action="store_true", help="print the figures as JSON (one run)")
    p.add_argument("--output-json", default=None)
    args, rest = p.parse_known_args(argv)
    if args.compare is None:
        res = measure(args)
        if args.json:
            print(json.dumps(res))
        else:
            show("run", res, args.rows)
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump({"rows": args.rows, "batch": args.batch, "figures": res}, f, indent=2)
        return 0
    # A/B: this script on each tree in turn, in fresh processes
    own = [a for a in (argv if argv is not None else sys.argv[1:])]
    i = own.index("--compare")
    own = own[:i] + own[i + 2:] + ["--json"]
    trees = {"before": os.path.abspath(args.compare), "after": os.path.dirname(HERE)}
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for _ in range(args.repeats):
        for side, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=tree)
            r = subprocess.run([sys.executable, os.path.abspath(__file__), *own], env=env,
                               capture_output=True, text=True, check=True)
            runs[side].append(json.loads(r.stdout.strip().splitlines()[-1]))
            show(side, runs[side][-1], args.rows)
    med = {side: {v: {k: statistics.median(run[v][k] for run in rs) for k in rs[0][v]} for v in rs[0]}
           for side, rs in runs.items()}
    print("medians:")
    for side in trees:
        show(side, med[side], args.rows)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"rows": args.rows, "batch": args.batch, "runs": runs, "medians": med}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
