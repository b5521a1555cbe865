"""Iteration-level scheduler (driver only), in the manner of nano-vllm's.

Two queues: `waiting` (FIFO; preempted requests go back to its head) and `running` (in
admission order). `schedule()` builds one step: every running request feeds its pending
tokens (one for decode, a chunk of the prompt under `max_prefill_tokens` for prefill), then
waiting requests are admitted on the shard with the most free blocks while the batch and
the prefill budget allow. When a running request needs a block and its shard has none, the
youngest running request on that shard is preempted (blocks freed, recomputed later). The
step's chunks are dealt into `micro_batches` micro-batches of balanced token counts.

Planning ahead (asynchronous scheduling): a request whose newest token is still on the
device is planned like any other; its decode chunk is fed from the previous step's sampled
tokens. A request whose token in flight is its last (`max_tokens` or the model's context)
is not planned again, and one that is in flight is never re-admitted or ended here before
that token is read back, so the tokens are exactly those of a synchronous loop.

With the prefix cache (block_manager.py) a request is admitted at its longest cached prefix
(`num_computed` starts there, the chunk's `new_blocks` carry the cached blocks with the new
ones); the full blocks a request computed are registered when its next chunk is planned or
its blocks are freed, never within the step that computes them.

`num_computed` advances when a chunk is planned; block tables reach the other ranks as the
blocks added since the request's last chunk (`new_blocks`) and the requests whose blocks
were freed (`StepPlan.released`).
"""

from __future__ import annotations

import operator
from collections import deque

from megatron_lamina.driver.block_manager import BlockManager
from megatron_lamina.requests.prompt import Capacity
from megatron_lamina.driver.request import Request, RequestStatus
from megatron_lamina.plan import MicroBatch, SequenceChunk, StepPlan


_SHARD = operator.attrgetter("shard")
_TOKENS = operator.attrgetter("tokens")


def reaches_length(outputs: int, tokens: int, max_tokens: int, max_model_len: int) -> bool:
    """The driver's length rule: a request with `outputs` output tokens and `tokens` tokens in
    all (prompt and outputs) ends with "length" once either reaches its bound. One rule for the
    scheduler (is the token in flight the last?), the engine's read-back, and the planner's
    simulator that replays both."""
    return outputs >= max_tokens or tokens >= max_model_len


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_size: int, max_prefill_tokens: int,
                 micro_batches: int, max_model_len: int):
        self.blocks, self.block_size = blocks, blocks.block_size
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.micro_batches, self.max_model_len = micro_batches, max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._ended: list[Request] = []   # finished by schedule() itself; the engine reports them
        self._released: list[int] = []    # request ids whose blocks were freed since the last plan

    @property
    def capacity(self) -> Capacity:
        return Capacity(self.max_model_len, self.blocks.num_blocks, self.blocks.block_size)

    def check_fits(self, request: Request) -> None:
        """Reject a request that could never run: too long for the model or the cache."""
        self.capacity.check(request.num_tokens)

    def add(self, request: Request) -> None:
        self.check_fits(request)
        if request.params.prompt_logprobs is not None and not request.prompt_logprobs:
            request.prompt_logprobs.append(None)  # the first prompt token has no log-probability
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def take_ended(self) -> list[Request]:
        ended, self._ended = self._ended, []
        return ended

    def take_released(self) -> list[int]:
        released, self._released = self._released, []
        return released

    def schedule(self) -> StepPlan:
        chunks: list[SequenceChunk] = []
        budget = self.max_prefill_tokens
        blocks, block_size, limit = self.blocks, self.blocks.block_size, self.blocks.num_blocks
        # The running requests, in admission order; a decode request (one pending token) is
        # the common case of every step and the loop is kept cheap for it (a step plans
        # hundreds of them while the GPU runs the previous one: names bound once).
        running, max_model_len, add, chunk = RequestStatus.RUNNING, self.max_model_len, chunks.append, self._chunk
        for request in list(self.running):
            if request.status is not running:
                continue  # preempted earlier in this loop
            in_flight = request.num_pending
            outputs = len(request.output_token_ids) + in_flight
            total = len(request.prompt_token_ids) + outputs
            if in_flight and reaches_length(outputs, total, request.params.max_tokens, max_model_len):
                continue  # the token in flight is its last: it ends when that token is read back
            computed = request.num_computed
            pending = total - computed
            table = request.block_table
            num_blocks = len(table)
            if pending == 1 and outputs and computed < num_blocks * block_size \
                    and request.num_blocks_sent == num_blocks and computed // block_size <= request.num_registered:
                # Steady decode, nearly every request of nearly every step: one token past the
                # prompt (so no prompt log-probabilities), its slot in a block already taken
                # and announced, no full block to register. `_chunk` plans it the same way;
                # this is that plan without the checks that only the other chunks need
                # (tests/test_scheduler_decode.py holds both to the request's state).
                request.num_computed = total
                add(SequenceChunk(request.request_id, request.shard, computed,
                                  [0] if in_flight else [request.output_token_ids[-1]], [], True,
                                  request.feed_row if in_flight else -1, False, table))
                continue
            n = 1 if pending == 1 else min(pending, budget)
            needed = -(-(computed + n) // block_size)
            if needed > limit:
                if request.num_pending:
                    continue  # decided once its token is read back, as a synchronous loop would
                # Its context no longer fits a whole shard's cache: it ends here, like at the
                # model's context limit (the driver reports "length").
                self.finish(request, "length")
                self._ended.append(request)
                continue
            if n == 0 or (needed > num_blocks and not self._reserve(request, computed + n)):
                continue
            budget -= n if pending > 1 else 0
            add(chunk(request, n, total))
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            request = self.waiting[0]
            if request.num_pending:
                break  # preempted with a token in flight: its tokens are not all known yet
            shard, hits = blocks.place(request)  # its longest cached prefix, and the shard holding it
            cached = len(hits) * block_size
            n = min(request.num_tokens - cached, budget)
            if not blocks.can_admit(shard, hits, cached + n):
                break
            self.waiting.popleft()
            request.status, request.num_computed = RequestStatus.RUNNING, cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = cached
            blocks.admit(request, shard, hits, cached + n)
            self.running.append(request)
            budget -= n
            chunks.append(self._chunk(request, n, request.num_tokens))
        offloads, loads = self.blocks.take_copies()  # the host tier's copies, run before this step
        assert chunks or not (offloads or loads), "host-tier copies are planned only with blocks taken"
        return StepPlan(self._split(chunks), released=self.take_released() if chunks else [],
                        offloads=offloads, loads=loads)

    def _reserve(self, request: Request, context_len: int) -> bool:
        """Grow the request's blocks, preempting the youngest on its shard if needed."""
        while not self.blocks.can_grow(request, context_len):
            victim = next(r for r in reversed(self.running) if r.shard == request.shard)
            self.preempt(victim)
            if victim is request:
                return False
        self.blocks.grow(request, context_len)
        return True

    def preempt(self, request: Request) -> None:
        self.num_preemptions += 1
        self._release(request)
        self.running.remove(request)
        request.status, request.shard, request.num_computed = RequestStatus.WAITING, -1, 0
        self.waiting.appendleft(request)

    def finish(self, request: Request, reason: str) -> None:
        request.status, request.finish_reason = RequestStatus.FINISHED, reason
        if request in self.running:
            self._release(request)
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def _release(self, request: Request) -> None:
        self.blocks.release(request)
        request.num_blocks_sent = 0
        self._released.append(request.request_id)

    def _chunk(self, request: Request, n: int, total: int) -> SequenceChunk:
        """The next `n` tokens of `request` (`total`: its tokens, those in flight included).
        A steady decode chunk is planned by `schedule` itself, by this rule's decode case."""
        start = request.num_computed
        if start // self.block_size > request.num_registered:  # computed by steps planned before this one
            self.blocks.register(request, start)
        if request.num_pending:  # the newest token is still on the device: fed from there
            assert n == 1 and start == total - 1, (request.request_id, n, start)
            tokens, feed = [0], request.feed_row
        else:
            tokens, feed = request.tokens(start, start + n), -1
        table, sent = request.block_table, request.num_blocks_sent
        if sent < len(table):
            new_blocks = table[sent:]
            request.num_blocks_sent = len(table)
        else:
            new_blocks = []
        request.num_computed = start + n
        # Prompt log-probabilities (echo) come from the logits of every prompt token, once.
        prompt_len = len(request.prompt_token_ids)
        wants_all = request.params.prompt_logprobs is not None and start < prompt_len \
            and len(request.prompt_logprobs) < prompt_len
        return SequenceChunk(request.request_id, request.shard, start, tokens, new_blocks, start + n == total, feed,
                             wants_all, table)

    def _split(self, chunks: list[SequenceChunk]) -> list[MicroBatch]:
        """Each chunk to the micro-batch with the fewest tokens so far (the first of them on a
        tie), each micro-batch ordered by shard (a stable sort: admission order within one)."""
        groups: list[list[SequenceChunk]] = [[] for _ in range(min(self.micro_batches, len(chunks)))]
        loads = [0] * len(groups)
        if len(groups) == 1:
            groups[0] = chunks
        elif sum(map(len, map(_TOKENS, chunks))) == len(chunks):
            # One token each (a decode step): the fewest-tokens rule deals them in turn.
            groups = [chunks[i::len(groups)] for i in range(len(groups))]
        elif len(groups) == 2:  # the common case, without a min() per chunk
            for chunk in chunks:
                i = 0 if loads[0] <= loads[1] else 1
                groups[i].append(chunk)
                loads[i] += len(chunk.tokens)
        else:
            for chunk in chunks:
                i = loads.index(min(loads))
                groups[i].append(chunk)
                loads[i] += len(chunk.tokens)
        return [MicroBatch(sorted(g, key=_SHARD)) for g in groups]
