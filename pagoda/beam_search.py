"""Beam search on top of the engine's logprobs, as vLLM's `LLM.beam_search` does it.

Each step runs every live beam of every prompt as a one-token request asking for the top
2 * beam_width logprobs (automatic prefix caching makes a beam's prompt nearly free: only its
last token is new), extends each beam by each of those tokens, and keeps the beam_width best
extensions per prompt by `beam_score`. An extension ending in EOS is finished (unless
ignore_eos). At the end the finished beams and the live ones compete by the same score.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pagoda.outputs import Logprob


@dataclass
class BeamSearchParams:
    """vLLM's names (``from pagoda.sampling_params import BeamSearchParams`` works too)."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        for name in ("beam_width", "max_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")


@dataclass
class BeamSearchSequence:
    """One beam: `tokens` are the prompt's and the generated ones; `text` the generated text."""
    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: Optional[str] = None
    finish_reason: Optional[str] = None   # "stop" (EOS) | "length"
    stop_reason: Optional[int] = None


@dataclass
class BeamSearchOutput:
    """The best beam_width beams of one prompt, best first."""
    sequences: list[BeamSearchSequence]


def beam_score(tokens: list[int], cum_logprob: float, eos_token_ids, length_penalty: float) -> float:
    """vLLM's ranking: the summed logprob over length ** length_penalty (the length counts the
    prompt, not a final EOS)."""
    n = len(tokens)
    if tokens and tokens[-1] in eos_token_ids:
        n -= 1
    return cum_logprob / (n ** length_penalty)


def beam_search(generate: Callable[[list[dict], Any], list], make_params: Callable[[int, float], Any],
                prompt_ids: list[list[int]], params: BeamSearchParams, eos_token_ids: set[int],
                max_model_len: int, decode: Optional[Callable[[list[int]], str]] = None,
                on_step: Optional[Callable[[], None]] = None) -> list[BeamSearchOutput]:
    """`generate(prompts, sampling_params)` runs one-token requests; `make_params(logprobs,
    temperature)` builds their SamplingParams."""
    bw = params.beam_width

    def key(b: BeamSearchSequence) -> float:
        return beam_score(b.tokens, b.cum_logprob, eos_token_ids, params.length_penalty)

    live = [[BeamSearchSequence(list(ids))] for ids in prompt_ids]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompt_ids]
    sp = make_params(2 * bw, params.temperature)
    for _ in range(params.max_tokens):
        for i, beams in enumerate(live):  # a beam at the context limit is finished
            full = [b for b in beams if len(b.tokens) >= max_model_len]
            for b in full:
                b.finish_reason = "length"
            done[i] += full
            live[i] = [b for b in beams if len(b.tokens) < max_model_len]
        flat = [(i, b) for i, beams in enumerate(live) for b in beams]
        if not flat:
            break
        outs = generate([{"prompt_token_ids": b.tokens} for _, b in flat], sp)
        candidates: list[list[BeamSearchSequence]] = [[] for _ in prompt_ids]
        for (i, beam), out in zip(flat, outs):
            step = out.outputs[0].logprobs[0]
            for tok, lp in step.items():
                new = BeamSearchSequence(beam.tokens + [tok], beam.logprobs + [step],
                                         beam.cum_logprob + lp.logprob)
                if tok in eos_token_ids and not params.ignore_eos:
                    new.finish_reason, new.stop_reason = "stop", None
                    done[i].append(new)
                else:
                    candidates[i].append(new)
        live = [sorted(c, key=key, reverse=True)[:bw] for c in candidates]
        if on_step is not None:
            on_step()
    results = []
    for ids, beams, finished in zip(prompt_ids, live, done):
        for b in beams:
            b.finish_reason = b.finish_reason or "length"
        best = sorted(finished + beams, key=key, reverse=True)[:bw]
        for b in best:
            gen = b.tokens[len(ids):]
            if b.finish_reason == "stop" and not params.include_stop_str_in_output:
                gen = gen[:-1]
            b.text = decode(gen) if decode is not None else None
        results.append(BeamSearchOutput(best))
    return results
