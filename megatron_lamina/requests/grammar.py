"""Compiled grammars and each constrained request's matcher, on xgrammar (driver and front end).

`GrammarCompiler` compiles a `StructuredOutput` against the model's vocabulary off the
caller's thread (a small pool: xgrammar releases the interpreter lock while it compiles), and
keeps the results in a cache bounded by count and keyed by the constraint's kind and text, so
a schema is compiled once however many requests use it; a request whose grammar is still
compiling waits outside the scheduler (`LLMEngine`) while the others step. `GrammarState` is
one request's matcher: `accept` takes each token read back, `fill` writes the next token's
allowed set into a row of the step's bitmask (1 bit per token id, int32 words: xgrammar's
layout, which `driver/token_mask.py` applies on the logits' device). `fill_bitmask` fills the
rows of one step's constrained requests with xgrammar's batched, multi-threaded fill.

xgrammar over llguidance: measured on the default model's 49,152-token vocabulary, its
per-step mask at batch 256 costs a fraction of llguidance's, which is the cost paid every
step; llguidance compiles a schema faster, which is paid once per schema and cached here
(docs/BENCHMARKS.md, "Structured outputs").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import xgrammar as xgr

from megatron_lamina.requests.structured_output import StructuredOutput


class GrammarCompiler:
    """`stop_token_ids`: the model's EOS ids, which end a complete grammar (None: the tokenizer's own)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int] | None, cache_size: int = 256,
                 max_chars: int = 65536, threads: int = 2):
        self.vocab_size, self.max_chars = vocab_size, max_chars
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_token_ids or []) or None)
        # xgrammar's own cache is off: ours is bounded by count and holds futures (compiles in flight).
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="lamina-grammar")
        self._cache: OrderedDict[StructuredOutput, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_size = cache_size
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, spec: StructuredOutput) -> Future:
        """The compiled grammar of `spec` (a future: done at once when cached). A failed compile
        is not cached: its future holds the error."""
        with self._lock:
            future = self._cache.get(spec)
            if future is not None:
                self._cache.move_to_end(spec)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[spec] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        future.add_done_callback(lambda f: f.exception() is not None and self._forget(spec, f))
        return future

    def _forget(self, spec: StructuredOutput, future: Future) -> None:
        with self._lock:
            if self._cache.get(spec) is future:
                del self._cache[spec]

    def _compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        spec.check(self.max_chars)  # what xgrammar would take but not enforce is refused too
        try:
            if spec.kind == "json":
                return self._compiler.compile_json_schema(spec.text, any_whitespace=False)
            if spec.kind == "json_object":  # any object (strict_mode off: any properties)
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                          strict_mode=False)
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.text)
            return self._compiler.compile_grammar(spec.ebnf())
        except RuntimeError as e:
            raise ValueError(f"invalid {spec.kind} constraint: {str(e).strip().splitlines()[0]}") from None

    def state(self, compiled: xgr.CompiledGrammar) -> "GrammarState":
        return GrammarState(xgr.GrammarMatcher(compiled))

    def new_bitmask(self, rows: int) -> torch.Tensor:
        return xgr.allocate_token_bitmask(rows, self.vocab_size)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class GrammarState:
    """One request's position in its grammar: the tokens it accepted so far."""

    def __init__(self, matcher: xgr.GrammarMatcher):
        self.matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance by one generated token; False if the grammar does not allow it."""
        return self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was taken: nothing may follow."""
        return self.matcher.is_terminated()


def fill_bitmask(compiler: GrammarCompiler, states: list[GrammarState], bitmask: torch.Tensor) -> None:
    """Rows 0..len(states)-1 of `bitmask` (int32, host) get each state's allowed next tokens."""
    compiler.batch.batch_fill_next_token_bitmask([s.matcher for s in states], bitmask)
