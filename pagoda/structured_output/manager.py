"""The engine core's structured outputs: compile grammars off the hot path, keep one matcher per
constrained request, and fill each step's token bitmask.

- **Compiling** a grammar against the vocabulary takes milliseconds to seconds, so it runs on a
  few threads (compile_threads.py); the scheduler admits a constrained request only once its
  grammar is ready (other requests go ahead meanwhile). Compilations are cached by what they
  depend on (`StructuredOutputsParams.key()`, LRU): many requests with one schema compile it
  once. The tokenizer (xgrammar's `TokenizerInfo`) is built by the first compilation, on those
  threads too. A compilation that runs past --structured-outputs-compile-timeout fails its
  requests (the request's own error: a 400 naming its field) and its thread stops holding up the
  others; the same constraint sent again fails at once until that compilation ends in the
  background, and is then served from the cache.
- **The vocabulary** the grammars compile against is the tokenizer's own ids, not the model's
  padded width: xgrammar treats padded ids as special tokens, and its `accept_token` searches
  them one by one (~30 us a token for Qwen3's 151,936 ids over a 49,152-id tokenizer, against
  ~1 us). Ids past the tokenizer's are masked in constrained rows on the device.
- **Matchers** advance with the step's sampled tokens, all rows in one call, when the scheduler
  resolves it (`accept_tokens`, from `Scheduler.update_from_output`).
- **The bitmask** of a step has one row per constrained request that samples in it (allowed
  tokens' bits set), filled by xgrammar's batch matcher on several threads into one of two
  reused host buffers (pinned on CUDA: the copy to the device does not sync). On overlapped steps
  (CUDA) a row depends on the token the step before sampled, which is known only once that step
  is read back: the engine core then hands the runner a `GrammarBitmask` whose `fill` resolves the
  previous step and fills the rows, and the runner calls it after queueing the forward pass, so
  the host's grammar work overlaps the device's (vLLM defers its sampling the same way).
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pagoda.sampling_params import StructuredOutputsParams
from pagoda.structured_output.compile_threads import CompileThreads, CompileTimeout
from pagoda.structured_output.grammar import build_grammar

logger = logging.getLogger("pagoda.structured_output")

MAX_CACHED_GRAMMARS = 256


@dataclass
class _RequestGrammar:
    """One constrained request: its compilation, then its matcher."""
    future: cf.Future
    stop_token_ids: list[int]
    matcher: Any = None        # xgrammar.GrammarMatcher once compiled
    error: Optional[str] = None
    invalid: bool = False      # the error is the request's own (its grammar timed out)
    broken: bool = False       # a token the grammar rejected: no longer constrained
    kind: str = ""             # the StructuredOutputsParams field that holds the constraint


@dataclass
class _Backend:
    compiler: Any      # xgrammar.GrammarCompiler for this vocabulary
    vocab_size: int    # the grammar's vocabulary: the tokenizer's ids (<= the model's)
    batch: Any         # xgrammar.BatchGrammarMatcher: fills many rows on several threads


class StructuredOutputManager:
    def __init__(self, vocab_size: int, load_tokenizer: Callable[[], Any], config: Optional[dict] = None,
                 pin_memory: bool = False, max_threads: Optional[int] = None,
                 compile_timeout_s: float = 0.0):
        self.vocab_size = vocab_size
        self._load_tokenizer = load_tokenizer
        self.config = config or {}
        self.pin_memory = pin_memory
        threads = max_threads or max(1, min(8, (os.cpu_count() or 2) // 2))
        self._threads = threads
        self._pool = CompileThreads(threads, compile_timeout_s, prepare=self._get_backend,
                                    on_late=self._compiled_late)
        self._backend: Optional[_Backend] = None
        self._backend_lock = threading.Lock()
        self._grammars: "OrderedDict[tuple, cf.Future]" = OrderedDict()
        self._cache_lock = threading.Lock()   # a late compilation lands from its own thread
        self.requests: dict[str, _RequestGrammar] = {}
        self._compiling: set[str] = set()   # requests whose matcher is not made yet
        self._buffers: list = []            # two host bitmasks, used in turn (see fill)
        self._turn = 0

    # -- compiling --------------------------------------------------------------------------------
    def _get_backend(self) -> _Backend:
        with self._backend_lock:
            if self._backend is None:
                import xgrammar as xgr
                tok = self._load_tokenizer()
                if tok is None:
                    raise ValueError("structured outputs need the model's tokenizer")
                info = xgr.TokenizerInfo.from_huggingface(tok)  # unpadded: see the module's notes
                if info.vocab_size > self.vocab_size:  # ids the model cannot produce
                    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=self.vocab_size)
                self._backend = _Backend(xgr.GrammarCompiler(info, max_threads=self._threads,
                                                             cache_enabled=False), info.vocab_size,
                                         xgr.BatchGrammarMatcher(self._threads))
            return self._backend

    def _compile(self, so: StructuredOutputsParams):
        backend = self._get_backend()
        any_ws = not self.config.get("disable_any_whitespace", False)
        return backend.compiler.compile_grammar(build_grammar(so, any_whitespace=any_ws))

    def compile(self, so: StructuredOutputsParams) -> cf.Future:
        """The compilation of `so` (shared with every request of the same key)."""
        key = so.key()
        with self._cache_lock:
            fut = self._grammars.get(key)
            if fut is not None and not (fut.done() and fut.exception() is not None
                                        and not isinstance(fut.exception(), CompileTimeout)):
                self._grammars.move_to_end(key)   # a timed-out one fails at once while it still runs
                return fut
            fut = self._pool.submit(lambda: self._compile(so), tag=key)
            self._grammars[key] = fut
            while len(self._grammars) > MAX_CACHED_GRAMMARS:
                self._grammars.popitem(last=False)
        return fut

    def _compiled_late(self, key: tuple, compiled) -> None:
        """An abandoned compilation finished after all: later requests with its key use it."""
        fut: cf.Future = cf.Future()
        fut.set_result(compiled)
        with self._cache_lock:
            if key in self._grammars:
                self._grammars[key] = fut

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, request_id: str, so: StructuredOutputsParams, stop_token_ids) -> None:
        self.requests[request_id] = _RequestGrammar(self.compile(so), list(stop_token_ids or ()),
                                                    kind=so.kind)
        self._compiling.add(request_id)

    def remove(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self._compiling.discard(request_id)

    def is_ready(self, request_id: str) -> bool:
        """False while the request's grammar compiles (or when it failed: see take_failures)."""
        if request_id not in self._compiling:
            return True
        st = self.requests[request_id]
        if not st.future.done():
            return False
        e = st.future.exception()
        if e is not None:
            if isinstance(e, CompileTimeout):   # the caller's: its constraint is too costly
                st.error, st.invalid = f"{st.kind}: {e} (--structured-outputs-compile-timeout)", True
            else:
                st.error = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
            return False
        import xgrammar as xgr
        vocab = self._get_backend().vocab_size
        stop = [t for t in st.stop_token_ids if t < vocab]  # an id the tokenizer lacks never comes
        st.matcher = xgr.GrammarMatcher(st.future.result(), override_stop_tokens=stop or None)
        self._compiling.discard(request_id)
        return True

    def take_failures(self) -> list[tuple[str, str, bool]]:
        """(request id, why, whether it is the request's own error) of requests whose grammar
        failed or timed out; they are forgotten."""
        if self._compiling:
            self._pool.expire()
        failed = []
        for rid in list(self._compiling):
            if not self.is_ready(rid) and self.requests[rid].error is not None:
                st = self.requests[rid]
                failed.append((rid, st.error, st.invalid))
                self.remove(rid)
        return failed

    def wait_for_any(self, timeout: float) -> None:
        """Block up to `timeout` s until a compilation in flight finishes (an engine with only
        compiling requests waits here instead of spinning)."""
        futs = [self.requests[r].future for r in self._compiling]
        if futs:
            due = self._pool.next_deadline()
            cf.wait(futs, timeout=timeout if due is None else min(timeout, due),
                    return_when=cf.FIRST_COMPLETED)

    @property
    def has_requests(self) -> bool:
        return bool(self.requests)

    def _active(self, request_id: str) -> Optional[_RequestGrammar]:
        """The request's state while its matcher constrains it."""
        st = self.requests.get(request_id)
        if st is None or st.matcher is None or st.broken or st.matcher.is_terminated():
            return None
        return st

    def accept_tokens(self, request_ids: list[str], tokens: list[int]) -> None:
        """Advance each request's matcher with its sampled token (one call for all of them)."""
        import xgrammar as xgr
        states, toks = [], []
        for rid, tok in zip(request_ids, tokens):
            st = self._active(rid)
            if st is not None:
                states.append((rid, st))
                toks.append(tok)
        if not states:
            return
        ok = xgr.BatchGrammarMatcher.batch_accept_token([st.matcher for _, st in states], toks)
        if all(ok):
            return
        for (rid, st), tok, good in zip(states, toks, ok):
            if not good:
                st.broken = True
                logger.warning("request %s: token %d is outside its grammar; the rest of its output "
                               "is not constrained", rid, tok)

    # -- the step's bitmask -----------------------------------------------------------------------
    def sampling_requests(self, num_scheduled_tokens: dict[str, int], requests: dict) -> list[str]:
        """Constrained requests of a step that sample a token in it (their prompt is done)."""
        out = []
        reqs = self.requests
        for rid, n in num_scheduled_tokens.items():
            if rid in reqs:
                r = requests[rid]
                if r.num_computed_tokens + n >= r.num_tokens:
                    out.append(rid)
        return out

    @property
    def grammar_vocab_size(self) -> int:
        return self._get_backend().vocab_size

    def fill(self, req_ids: list[str]):
        """(bitmask int32 [k, ceil(grammar_vocab_size / 32)], the k requests of its rows): the
        rows of those of `req_ids` still constrained (not gone, grammar not ended or broken).

        The bitmask is a view of one of two host buffers used in turn: a step's bitmask is
        copied to the device before the step samples, and the engine fills step N+1's only
        after step N was read back, so the buffer of step N-1 is free again."""
        import torch
        backend = self._get_backend()
        matchers, rows = [], []
        for rid in req_ids:
            st = self._active(rid)
            if st is not None:
                matchers.append(st.matcher)
                rows.append(rid)
        k, width = len(rows), (backend.vocab_size + 31) // 32
        if len(self._buffers) < 2 or self._buffers[0].shape[0] < k:
            size = max(k, 256, 2 * self._buffers[0].shape[0] if self._buffers else 0)
            self._buffers = [torch.empty((size, width), dtype=torch.int32, pin_memory=self.pin_memory)
                             for _ in range(2)]
        self._turn ^= 1
        bitmask = self._buffers[self._turn][:k]
        if k == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        elif k:
            backend.batch.batch_fill_next_token_bitmask(matchers, bitmask)
        return bitmask, rows

    def shutdown(self) -> None:
        self._pool.shutdown()
