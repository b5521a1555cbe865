"""Discrete-event replay of a trace through a mirror of the engine (DESIGN.md section 8).

The scheduling is the engine's own logic (engine/scheduler.py, block_manager.py,
llm_engine.py), restated over token counts instead of tokens:
  * one step at a time; requests that arrived by the start of a step join `waiting`;
  * every running request feeds its pending tokens: one for decode, else a prompt chunk
    under the step's `max_prefill_tokens` budget; then waiting requests are admitted, FIFO,
    while the batch cap and the budget allow, each on the request shard with the most free
    KV blocks, if that shard has the blocks for its first chunk;
  * a request whose shard has no block for its next token preempts the youngest running
    request of that shard (possibly itself): its blocks are freed and it goes back to the
    head of `waiting`, to be recomputed (prompt + the tokens it already has) later;
  * the step's chunks are dealt into `micro_batches` micro-batches, balancing tokens;
  * every chunk that ends its request's known tokens yields one token at the end of the
    step; a request is done at its trace output length (ignore_eos) or at the model's
    context length.
The step's duration comes from the cost tables through pipeline.py (see there and
docs/PLANNER.md for the formula). One deviation: a request whose context outgrows a whole
shard's cache is finished as `kv_capacity` here; the engine would preempt and recompute it
forever.

`decode_only=True` is the paper's setting instead of our engine's: prefill runs on other
workers that are not modelled, so an admitted request arrives with its prompt's KV (blocks
for the whole prompt, no prefill budget) and every step only decodes; TTFT then excludes
prefill.

`simulate(..., saturate=True)` measures the layout's capacity instead of replaying the
trace's arrival times: the trace's lengths, cycled, all waiting at time 0; throughput is
counted over the saturated window only (from the first `max_batch_size` completions to the
last step that still had requests waiting), and the latency percentiles over the requests
that ran entirely inside it.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from megatron_lamina.planner.cost_table import CostTable, prefill_pairs
from megatron_lamina.planner.layout import Layout
from megatron_lamina.planner.pipeline import (
    MicroBatchCost, ShardWork, colocated_step_time, disaggregated_step_time,
)
from megatron_lamina.planner.shapes import ModelShape
from megatron_lamina.planner.stats import summarize
from megatron_lamina.planner.trace import TraceRequest

WAITING, RUNNING, FINISHED = 0, 1, 2


class SimRequest:
    __slots__ = ("index", "arrival_s", "prompt_len", "output_len", "generated", "num_computed", "shard",
                 "blocks", "status", "first_token_s", "finish_s", "finish_reason", "preemptions")

    def __init__(self, index: int, r: TraceRequest):
        self.index, self.arrival_s, self.prompt_len, self.output_len = index, r.arrival_s, r.input_len, r.output_len
        self.generated = self.num_computed = self.blocks = self.preemptions = 0
        self.shard, self.status = -1, WAITING
        self.first_token_s = self.finish_s = None
        self.finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.generated


@dataclass
class StepCostModel:
    """Turns a step's micro-batches into seconds with the cost tables (docs/PLANNER.md)."""

    layout: Layout
    shape: ModelShape
    model_costs: CostTable
    attention_costs: CostTable    # the model device's own table when colocated

    def __post_init__(self):
        lay, shape, b = self.layout, self.shape, self.model_costs.dtype_bytes
        # Colocated: each TP rank attends over its kv_heads/TP; disaggregated: each head group
        # over kv_heads/groups. Attention time is taken as proportional to the heads.
        self.attention_share = 1 / (lay.tp if lay.colocated else lay.head_groups)
        # The busiest end of a transfer moves its heads' share of every row: a TP rank sends
        # its kv_heads/TP, an attention worker receives its kv_heads/groups.
        split = min(lay.tp, lay.head_groups)
        self.send_bytes_per_row = shape.attention_in_bytes_per_token(b) / split
        self.reply_bytes_per_row = shape.attention_out_bytes_per_token(b) / split

    def step_time(self, micro_batches: list[list[tuple[SimRequest, int]]], sampled_rows: int) -> float:
        lay, model, att = self.layout, self.model_costs, self.attention_costs
        costs = []
        for chunks in micro_batches:
            tokens = 0
            per_shard: dict[int, list] = {}   # shard -> [decode requests, context sum, prefill s, rows]
            for r, n in chunks:
                tokens += n
                work = per_shard.setdefault(r.shard, [0, 0, 0.0, 0])
                end = r.num_computed + n
                if n == 1:
                    work[0] += 1
                    work[1] += end
                else:
                    work[2] += att.prefill_attention_time(prefill_pairs(n, end))
                work[3] += n
            shards = []
            for shard, (decodes, context, prefill_s, rows) in sorted(per_shard.items()):
                attention = (att.decode_attention_time(decodes, context) + prefill_s) * self.attention_share
                if lay.colocated:
                    shards.append(ShardWork(shard, attention))
                else:
                    shards.append(ShardWork(shard, attention, att.network_time(rows * self.send_bytes_per_row),
                                            att.network_time(rows * self.reply_bytes_per_row)))
            costs.append(MicroBatchCost(model.model_time(lay.tp, tokens), shards))
        step = (colocated_step_time if lay.colocated else disaggregated_step_time)(self.shape.num_layers, costs)
        return step + model.overhead_time(lay.tp, sampled_rows)


@dataclass
class SimResult:
    layout: Layout
    num_blocks: int
    requests: int
    completed: int
    rejected: int                 # could never run: prompt >= the model's context ...
    rejected_kv: int              # ... or longer than one shard's KV cache
    kv_capacity: int              # outgrew one shard's cache while running (see module doc)
    truncated: int                # stopped at the model's context before their output length
    duration_s: float             # the measured window (saturate) or first arrival .. last finish
    output_tokens: int            # in the window
    input_tokens: int             # of the requests completed in the window
    steps: int
    mean_batch: float             # requests per step (mean over steps)
    max_batch: int                # most requests in one step
    preemptions: int
    saturated: bool | None        # saturate mode: whether a saturated window existed
    ttft_s: dict = field(default_factory=dict)
    tpot_s: dict = field(default_factory=dict)
    e2e_s: dict = field(default_factory=dict)

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def request_throughput(self) -> float:
        return self.completed / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"layout": self.layout.to_dict(), "label": self.layout.label, "num_blocks": self.num_blocks,
                "requests": self.requests, "completed": self.completed, "rejected": self.rejected,
                "rejected_kv": self.rejected_kv, "kv_capacity": self.kv_capacity, "truncated": self.truncated,
                "duration_s": self.duration_s, "output_tokens": self.output_tokens,
                "input_tokens": self.input_tokens,
                "output_throughput_tok_s": self.output_throughput,
                "request_throughput_req_s": self.request_throughput, "steps": self.steps,
                "mean_batch": self.mean_batch, "max_batch": self.max_batch,
                "preemptions": self.preemptions, "saturated": self.saturated,
                "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s}


class EngineSimulator:
    def __init__(self, layout: Layout, shape: ModelShape, model_costs: CostTable,
                 attention_costs: CostTable | None, num_blocks: int, max_model_len: int | None = None,
                 decode_only: bool = False):
        if num_blocks < 1:
            raise ValueError(f"{layout.label}: no KV blocks (the weights do not fit, or kv blocks = {num_blocks})")
        self.layout, self.shape = layout, shape
        self.num_blocks, self.block_size = num_blocks, layout.block_size
        self.max_model_len = max_model_len or shape.max_context
        self.costs = StepCostModel(layout, shape, model_costs, attention_costs or model_costs)
        self.free = [num_blocks] * layout.request_shards
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.preemptions = 0
        self.decode_only = decode_only
        self.prefilled = 0  # prompt tokens in the last scheduled step

    # -------------------------------------------------------------- the scheduler's mirror
    def blocks_needed(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def schedule(self) -> list[tuple[SimRequest, int]]:
        chunks: list[tuple[SimRequest, int]] = []
        budget = self.layout.max_prefill_tokens
        capacity = self.block_size
        for r in list(self.running):
            if r.status != RUNNING:
                continue  # preempted earlier in this loop
            pending = r.prompt_len + r.generated - r.num_computed
            if pending == 1:  # decode; the common case: the token fits in the last block
                if r.num_computed < r.blocks * capacity or self.reserve(r, r.num_computed + 1):
                    chunks.append((r, 1))
                continue
            n = min(pending, budget)
            if n == 0 or not self.reserve(r, r.num_computed + n):
                continue
            budget -= n
            chunks.append((r, n))
        while self.waiting and len(self.running) < self.layout.max_batch_size and budget > 0:
            r = self.waiting[0]
            shard = max(range(len(self.free)), key=lambda s: (self.free[s], -s))
            if self.decode_only:  # the prompt's KV comes from a prefill worker: decode its last token
                computed, n = r.num_tokens - 1, 1
            else:
                computed, n = 0, min(r.num_tokens, budget)
            if self.free[shard] < self.blocks_needed(computed + n):
                break
            self.waiting.popleft()
            r.status, r.shard, r.num_computed = RUNNING, shard, computed
            self.grow(r, computed + n)
            self.running.append(r)
            budget -= n if not self.decode_only else 0
            chunks.append((r, n))
        self.prefilled = self.layout.max_prefill_tokens - budget  # 0: every chunk is one token
        return chunks

    def grow(self, r: SimRequest, context_len: int) -> None:
        extra = self.blocks_needed(context_len) - r.blocks
        if extra > 0:
            self.free[r.shard] -= extra
            r.blocks += extra

    def reserve(self, r: SimRequest, context_len: int) -> bool:
        if self.blocks_needed(context_len) > self.num_blocks:
            self.finish(r, "kv_capacity", None)
            return False
        while self.blocks_needed(context_len) - r.blocks > self.free[r.shard]:
            victim = next(v for v in reversed(self.running) if v.shard == r.shard)
            self.preempt(victim)
            if victim is r:
                return False
        self.grow(r, context_len)
        return True

    def release(self, r: SimRequest) -> None:
        self.free[r.shard] += r.blocks
        r.blocks = 0

    def preempt(self, r: SimRequest) -> None:
        self.preemptions += 1
        r.preemptions += 1
        self.release(r)
        self.running.remove(r)
        r.status, r.shard, r.num_computed = WAITING, -1, 0
        self.waiting.appendleft(r)

    def finish(self, r: SimRequest, reason: str, now: float | None) -> None:
        if r in self.running:
            self.release(r)
            self.running.remove(r)
        r.status, r.finish_reason, r.finish_s = FINISHED, reason, now

    def split(self, chunks: list[tuple[SimRequest, int]]) -> list[list[tuple[SimRequest, int]]]:
        """Scheduler._split: each chunk to the micro-batch with the fewest tokens so far (the
        first such one on ties)."""
        count = min(self.layout.micro_batches, len(chunks))
        if count == 1:
            return [chunks]
        if self.prefilled == 0:  # all chunks are single tokens: the greedy deal is round-robin
            return [chunks[i::count] for i in range(count)]
        groups: list[list[tuple[SimRequest, int]]] = [[] for _ in range(count)]
        loads = [(0, i) for i in range(count)]  # a heap: fewest tokens, then lowest index
        for chunk in chunks:
            load, i = loads[0]
            groups[i].append(chunk)
            heapq.heapreplace(loads, (load + chunk[1], i))
        return groups

    # ------------------------------------------------------------------------ the replay
    def run(self, trace: list[TraceRequest], saturate: bool = False) -> SimResult:
        if saturate:
            count = max(len(trace), 4 * self.layout.max_batch_size)
            trace = [TraceRequest(0.0, trace[i % len(trace)].input_len, trace[i % len(trace)].output_len)
                     for i in range(count)]
        requests = [SimRequest(i, r) for i, r in enumerate(trace)]
        arrivals = [(r.arrival_s, r.index) for r in requests]
        heapq.heapify(arrivals)
        rejected = []
        now, steps, batch_sum, max_batch, generated = 0.0, 0, 0, 0, 0
        warmup = min(self.layout.max_batch_size, len(requests) // 4) if saturate else 0
        window_start: tuple[float, int] | None = None if saturate else (0.0, 0)
        window_end: tuple[float, int] | None = None
        completed = 0
        while arrivals or self.waiting or self.running:
            while arrivals and arrivals[0][0] <= now:
                r = requests[heapq.heappop(arrivals)[1]]
                if r.num_tokens >= self.max_model_len:
                    r.status, r.finish_reason = FINISHED, "rejected"
                    rejected.append(r)
                elif self.blocks_needed(r.num_tokens + 1) > self.num_blocks:
                    r.status, r.finish_reason = FINISHED, "rejected_kv"
                    rejected.append(r)
                else:
                    self.waiting.append(r)
            if not self.waiting and not self.running:
                if arrivals:
                    now = max(now, arrivals[0][0])
                continue
            was_waiting = bool(self.waiting)
            chunks = self.schedule()
            if not chunks:
                # Nothing runs (so nothing is running) and the head of the queue cannot get the
                # blocks of its first chunk even from an empty shard: it never could.
                assert not self.running
                self.finish(self.waiting.popleft(), "kv_capacity", None)
                continue
            sampled = [r for r, n in chunks if r.num_computed + n == r.prompt_len + r.generated]
            now += self.costs.step_time(self.split(chunks), len(sampled))
            steps += 1
            batch_sum += len(chunks)
            max_batch = max(max_batch, len(chunks))
            for r, n in chunks:
                r.num_computed += n
            done = 0
            for r in sampled:
                r.generated += 1
                if r.first_token_s is None:
                    r.first_token_s = now
                if r.generated >= r.output_len or r.prompt_len + r.generated >= self.max_model_len:
                    # finish(), with one pass over `running` per step instead of one per request
                    self.release(r)
                    r.status, r.finish_s = FINISHED, now
                    r.finish_reason = "length" if r.generated >= r.output_len else "context"
                    done += 1
            if done:
                self.running = [r for r in self.running if r.status == RUNNING]
            generated += len(sampled)
            completed += done
            if saturate:
                if window_start is None and completed >= warmup:
                    window_start = (now, generated)
                if was_waiting and window_start is not None:
                    window_end = (now, generated)
        return self._result(requests, rejected, now, steps, batch_sum, max_batch, generated, saturate,
                            window_start, window_end)

    def _result(self, requests, rejected, now, steps, batch_sum, max_batch, generated, saturate,
                window_start, window_end):
        finished = [r for r in requests if r.finish_reason in ("length", "context")]
        saturated = None
        if saturate:
            saturated = window_start is not None and window_end is not None and window_end[0] > window_start[0]
        if saturated:
            (t0, g0), (t1, g1) = window_start, window_end
            inside = [r for r in finished if r.first_token_s is not None and r.arrival_s <= t1
                      and r.finish_s <= t1 and r.first_token_s >= t0]
            measured = inside if len(inside) >= 10 else finished
            duration, output_tokens = t1 - t0, g1 - g0
            done_in_window = [r for r in finished if t0 < r.finish_s <= t1]
        else:
            start = min((r.arrival_s for r in requests), default=0.0)
            measured, duration, output_tokens, done_in_window = finished, now - start, generated, finished
        tpot = [(r.finish_s - r.first_token_s) / (r.generated - 1) for r in measured if r.generated > 1]
        return SimResult(
            layout=self.layout, num_blocks=self.num_blocks, requests=len(requests),
            completed=len(done_in_window), rejected=sum(r.finish_reason == "rejected" for r in rejected),
            rejected_kv=sum(r.finish_reason == "rejected_kv" for r in rejected),
            kv_capacity=sum(r.finish_reason == "kv_capacity" for r in requests),
            truncated=sum(r.finish_reason == "context" and r.generated < r.output_len for r in requests),
            duration_s=duration, output_tokens=output_tokens,
            input_tokens=sum(r.prompt_len for r in done_in_window), steps=steps,
            mean_batch=batch_sum / steps if steps else 0.0, max_batch=max_batch, preemptions=self.preemptions, saturated=saturated,
            ttft_s=summarize([r.first_token_s - r.arrival_s for r in measured]),
            tpot_s=summarize(tpot), e2e_s=summarize([r.finish_s - r.arrival_s for r in measured]))


def simulate(trace: list[TraceRequest], layout: Layout, shape: ModelShape, model_costs: CostTable,
             attention_costs: CostTable | None, num_blocks: int, max_model_len: int | None = None,
             saturate: bool = False, decode_only: bool = False) -> SimResult:
    layout.check(shape)
    return EngineSimulator(layout, shape, model_costs, attention_costs, num_blocks, max_model_len,
                           decode_only).run(trace, saturate)
