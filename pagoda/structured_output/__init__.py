"""Structured outputs: constrain what a request may generate (a JSON schema, a regex, a choice, an
EBNF / Lark grammar, a structural tag) with xgrammar, as vLLM does.

- `grammar.py`: a request's `StructuredOutputsParams` -> an xgrammar `Grammar` (no tokenizer
  needed), and the front end's validation with it, so a bad schema is a 400 before the request
  reaches the engine core.
- `manager.py`: the engine core's side: grammars compile against the tokenizer in a thread
  pool, cached by what they depend on; each request gets a matcher that the scheduler advances
  with its sampled tokens; every step the manager fills the token bitmask of the constrained
  rows, which travels to the worker in `SchedulerOutput.grammar`.
- The worker applies it to the logits on the device (`pagoda.sample.grammar_bitmask`).
"""
from pagoda.structured_output.grammar import GrammarError, build_grammar, validate_structured_outputs

__all__ = ["GrammarError", "build_grammar", "validate_structured_outputs"]
