"""`pagoda generate` (one-shot completion) and `pagoda chat` (interactive chat in the terminal)."""
from __future__ import annotations

import argparse
import sys


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sampling-seed", type=int, default=None, help="seed of this request's sampler")


def register(sub) -> None:
    from pagoda.config import EngineArgs
    for name, fn, help_ in (("generate", _generate, "complete one or more prompts and exit"),
                            ("chat", _chat, "chat with the model in the terminal")):
        p = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == "generate":  # the model is named with --model here: positionals are prompts
            p.add_argument("prompts", nargs="*", help="prompts (read from stdin when none)")
        else:
            p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                           help="model (same as --model); default: the bundled SmolLM2-135M-Instruct")
            p.add_argument("--system", default=None, help="system message")
        EngineArgs.add_cli_args(p)
        _sampling_flags(p)
        p.set_defaults(func=fn)


def _make(args):
    from pagoda.config import EngineArgs
    from pagoda.llm import LLM
    from pagoda.sampling_params import SamplingParams
    if getattr(args, "model_tag", None) and not args.model:
        args.model = args.model_tag
    ea = EngineArgs.from_cli_args(args)
    llm = LLM(**{k: v for k, v in vars(ea).items() if k != "extra"})
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, seed=args.sampling_seed)
    return llm, sp


def _generate(args) -> int:
    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        print("pagoda generate: error: give prompts as arguments or on stdin", file=sys.stderr)
        return 2
    llm, sp = _make(args)
    for out in llm.generate(prompts, sp, use_tqdm=len(prompts) > 1):
        print(out.outputs[0].text)
    return 0


def _chat(args) -> int:
    llm, sp = _make(args)
    conv = [{"role": "system", "content": args.system}] if args.system else []
    print("pagoda chat — empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        conv.append({"role": "user", "content": line})
        text = llm.chat(conv, sp, use_tqdm=False)[0].outputs[0].text
        print(text)
        conv.append({"role": "assistant", "content": text})
    return 0
