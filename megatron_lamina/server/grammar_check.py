"""The front end's check of a request's output constraint, before the engine sees the request.

A schema, regex or grammar is compiled here against the model's vocabulary, with the same
`GrammarCompiler` (and so the same rules and limits) the engine uses, in its threads, so the
event loop goes on serving. What cannot compile (an invalid schema, an unsupported keyword,
a regex or EBNF that does not parse, more than `server.max_grammar_chars`) is a 400 naming
the field; a compile that takes longer than `server.grammar_compile_timeout_s` (a hostile
schema) is a 400 too, and its result, kept in the cache when it comes, answers the next
request with the same text at once. The engine compiles again in its own process (its cache
is keyed the same way), which costs one compile per new constraint per process.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING

from megatron_lamina.config import ServerConfig
from megatron_lamina.requests.structured_output import StructuredOutput
from megatron_lamina.requests.tokenizer import TextCodec
from megatron_lamina.server.protocol import ApiError

if TYPE_CHECKING:  # xgrammar is imported by the first constrained request, not by every start
    from megatron_lamina.requests.grammar import GrammarCompiler


class GrammarCheck:
    def __init__(self, codec: TextCodec, config: ServerConfig):
        self.codec, self.config = codec, config
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    def compiler(self, vocab_size: int) -> GrammarCompiler:
        with self._lock:  # the first constrained request: the vocabulary's tables, once
            if self._compiler is None:
                from megatron_lamina.requests.grammar import GrammarCompiler

                self._compiler = GrammarCompiler(self.codec.tokenizer, vocab_size, None, self.config.grammar_cache_size,
                                                 self.config.max_grammar_chars)
        return self._compiler

    async def check(self, spec: StructuredOutput, field: str, vocab_size: int) -> None:
        """ApiError 400 naming `field` when `spec` does not compile within the time allowed."""
        if self._compiler is None:  # its tokenizer tables take a moment: off the event loop
            await asyncio.to_thread(self.compiler, vocab_size)
        future = self._compiler.compile(spec)
        timeout = self.config.grammar_compile_timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
        except asyncio.TimeoutError:
            raise ApiError(400, f"{field}: the {spec.kind} constraint did not compile within "
                                f"server.grammar_compile_timeout_s = {timeout:g} s; simplify it", field) from None
        except ValueError as e:
            raise ApiError(400, f"{field}: {e}", field) from None
