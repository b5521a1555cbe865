"""Discrete-event replay of a trace through the engine's own scheduler (DESIGN.md section 8).

The scheduling policy is not restated here: `EngineSimulator` drives the engine's
`Scheduler` and `BlockManager` (driver/scheduler.py, block_manager.py) with `Request`s whose
tokens are placeholders, and supplies only what the engine's driver (llm_engine.py) and the
devices would:
  * a clock: requests that arrived by the start of a step are added (`Scheduler.add`; a
    request its `check_fits` refuses is `rejected` when the prompt reaches the model's
    context, `rejected_kv` when it is longer than one shard's whole cache), and every
    planned step advances the clock by its duration;
  * one placeholder token per sampled chunk at the end of the step, and the driver's stop
    rule (scheduler.reaches_length: the trace's output length with ignore_eos, or the
    model's context): the request ends with `length` (`Scheduler.finish`). A request the
    scheduler ended itself because its context outgrew a whole shard's cache (`take_ended`,
    also `length` to the client) is counted as `kv_capacity`, one stopped at the model's
    context short of its output length as `truncated`; both count as completed;
  * the step's duration, from the cost tables and the model-attention link (link.py) through
    pipeline.py (`StepCostModel`; see there and docs/PLANNER.md for the formula); attention
    at the layout's `kv_cache_dtype` (cost_table.py: an FP8 cache's rows, or their estimate).
    The exchange carries the model dtype's k and v either way (the cache's rank quantizes).
It replays the synchronous loop (`scheduler.async_scheduling: false`: plan, run, read back).
With asynchronous scheduling the tokens are the same, but a request's last token is read
back after the next step is planned, so its batch slot and blocks free one step later.

`decode_only=True` is the paper's setting instead of our engine's: prefill runs on other
workers that are not modelled, so an admitted request arrives with its prompt's KV and every
step only decodes; TTFT then excludes prefill. The scheduler plans it with an unbounded
prefill budget (an admission takes no budget, the blocks of its whole prompt), and each chunk
costs one decode token at its context, the step's chunks dealt round-robin into the
micro-batches as the scheduler deals single tokens.

With `prefix_caching` the engine's prefix cache runs too (driver/block_manager.py): each
prompt is built from its trace request's `hash_ids` (Mooncake: equal ids, equal 512-token
blocks; a request without ids, or past them, shares nothing), so hits come from the trace's
sharing and the capacity of the layout's KV pool (a shard's blocks, every shard its own)
plus `host_blocks` host-tier slots per shard. A hit's tokens are not computed, so its chunk
costs only the rest of the prompt; the host tier's copies are not costed (the copy engine's).
`SimResult.prefix_hit_rate` is the share of the completed requests' prompt tokens served.

`simulate(..., saturate=True)` measures the layout's capacity instead of replaying the
trace's arrival times: the trace's lengths, cycled, all waiting at time 0 (each pass's
`hash_ids` moved past the previous pass's: a pass is new traffic that shares what the trace
shares, not the same prompts again, which the prefix cache would serve); throughput is
counted over the saturated window only (from the first `max_batch_size` completions to the
last step that still had requests waiting), and the latency percentiles over the requests
that ran entirely inside it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable
import torch

from megatron_lamina.config import micro_batches_run
from megatron_lamina.driver.block_manager import BlockManager
from megatron_lamina.driver.request import Request
from megatron_lamina.requests.sampling_params import SamplingParams
from megatron_lamina.driver.scheduler import Scheduler, reaches_length
from megatron_lamina.plan import StepPlan
from megatron_lamina.planner.cost_table import CostTable, prefill_pairs
from megatron_lamina.planner.layout import Layout
from megatron_lamina.planner.link import Link
from megatron_lamina.planner.pipeline import (
    MicroBatchCost, ShardWork, colocated_step_time, disaggregated_step_time,
)
from megatron_lamina.planner.shapes import ModelShape
from megatron_lamina.planner.stats import summarize
from megatron_lamina.planner.trace import TRACE_BLOCK, TraceRequest


# What one chunk of a step costs: (shard, end, tokens): `tokens` fed on request shard `shard`,
# the request's context being `end` tokens after them (one token: a decode row; more: a
# prefill chunk). A plain tuple: a step of a large batch builds hundreds.
ChunkWork = tuple[int, int, int]


@dataclass
class StepCostModel:
    """Turns a step's micro-batches into seconds with the cost tables (docs/PLANNER.md)."""

    layout: Layout
    shape: ModelShape
    model_costs: CostTable
    attention_costs: CostTable    # the model device's own table when colocated
    # The model-attention network: each exchange message costs `link.message_time`; None:
    # the attention table's own `network` curve (what profile_costs.py timed, on one host).
    link: Link | None = None

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

    def exchange_time(self, nbytes: float) -> float:
        """One message between the model node and an attention worker, one way."""
        return self.attention_costs.network_time(nbytes) if self.link is None else self.link.message_time(nbytes)

    def step_time(self, micro_batches: list[list[ChunkWork]], sampled_rows: int, decoded_tokens: int = 0) -> float:
        """`decoded_tokens`: the output tokens the sampled rows hold after the step (only a
        serving overhead's per-token term reads it, serving_overhead.py)."""
        return self.pipelined_time(self.micro_batch_costs(micro_batches), sampled_rows)

    def micro_batch_costs(self, micro_batches: list[list[ChunkWork]]) -> list[MicroBatchCost]:
        """Each micro-batch's model time per layer, and its shards' attention and exchange times."""
        lay, model, att = self.layout, self.model_costs, self.attention_costs
        costs = []
        for chunks in micro_batches:
            tokens = 0
            per_shard: dict[int, list] = {}   # shard -> [decode requests, context sum, prefill s, rows]
            for shard, end, n in chunks:
                tokens += n
                work = per_shard.setdefault(shard, [0, 0, 0.0, 0])
                if n == 1:
                    work[0] += 1
                    work[1] += end
                else:
                    work[2] += att.prefill_attention_time(prefill_pairs(n, end), lay.kv_cache_dtype)
                work[3] += n
            shards = []
            for shard, (decodes, context, prefill_s, rows) in sorted(per_shard.items()):
                attention = (att.decode_attention_time(decodes, context, lay.kv_cache_dtype) + prefill_s) \
                    * self.attention_share
                if lay.colocated:
                    shards.append(ShardWork(shard, attention))
                else:
                    shards.append(ShardWork(shard, attention, self.exchange_time(rows * self.send_bytes_per_row),
                                            self.exchange_time(rows * self.reply_bytes_per_row)))
            costs.append(MicroBatchCost(model.model_time(lay.tp, tokens), shards))
        return costs

    def pipelined_time(self, costs: list[MicroBatchCost], sampled_rows: int) -> float:
        """The step's layers through the colocated or the staggered pipeline, and the step overhead."""
        lay = self.layout
        step = (colocated_step_time if lay.colocated else disaggregated_step_time)(self.shape.num_layers, costs)
        return step + self.model_costs.overhead_time(lay.tp, sampled_rows)


@dataclass
class SimResult:
    layout: Layout
    num_blocks: int
    requests: int
    completed: int
    rejected: int                 # could never run: prompt >= the model's context ...
    rejected_kv: int              # ... or longer than one shard's KV cache
    kv_capacity: int              # ended by the scheduler: outgrew one shard's cache while running
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
    prefix_hit_rate: float | None = None  # with the prefix cache: prompt tokens served from it
    # Per trace request, in the trace's order (a replay measuring a part of it, bench/prefix_predict.py):
    # its first token's time from its arrival (None: no token), the prompt tokens the prefix cache served.
    ttft_by_request: list[float | None] = field(default_factory=list)
    cached_by_request: list[int] = field(default_factory=list)

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
                "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s,
                "prefix_hit_rate": self.prefix_hit_rate}


FINISHED = ("length", "context", "kv_capacity")


@dataclass(slots=True)
class Replayed:
    """One trace request in the replay: the engine's `Request` (None if it was refused) and
    what the clock saw of it. `outcome`: length (its output length), context (the model's
    context came first), kv_capacity (ended by the scheduler), rejected or rejected_kv."""

    trace: TraceRequest
    request: Request | None = None
    outcome: str | None = None
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def generated(self) -> int:
        return len(self.request.output_token_ids) if self.request is not None else 0


class EngineSimulator:
    """The engine's scheduler on a clock: `run` replays a trace, one engine step at a time."""

    def __init__(self, costs: StepCostModel, num_blocks: int, max_model_len: int | None = None,
                 decode_only: bool = False, prefix_caching: bool = False, host_blocks: int = 0):
        if prefix_caching and decode_only:
            raise ValueError("the prefix cache saves prefill, which decode_only does not model")
        if num_blocks < 1:
            raise ValueError(f"{costs.layout.label}: no KV blocks (the weights do not fit, or kv blocks = "
                             f"{num_blocks})")
        self.costs, self.layout, self.num_blocks = costs, costs.layout, num_blocks
        self.max_model_len = max_model_len or costs.shape.max_context
        self.decode_only = decode_only
        self.prefix_caching, self.host_blocks = prefix_caching, host_blocks

    def scheduler(self) -> Scheduler:
        """A fresh engine scheduler over this layout's request shards and KV blocks."""
        lay = self.layout
        budget = sys.maxsize if self.decode_only else lay.max_prefill_tokens
        # Without the prefix cache the prompts are shared placeholders, which it would all hit.
        blocks = BlockManager(lay.request_shards, self.num_blocks, lay.block_size, self.prefix_caching,
                              self.host_blocks)
        return Scheduler(blocks, lay.max_batch_size,
                         budget, micro_batches_run(lay.attention_workers, lay.micro_batches), self.max_model_len)

    def work(self, plan: StepPlan) -> list[list[ChunkWork]]:
        """The plan's micro-batches as the cost model reads them (module doc for decode_only)."""
        if not self.decode_only:
            return [[(c.shard, c.start + len(c.tokens), len(c.tokens)) for c in mb.chunks]
                    for mb in plan.micro_batches]
        chunks = [(c.shard, c.start + len(c.tokens), 1) for mb in plan.micro_batches for c in mb.chunks]
        count = min(micro_batches_run(self.layout.attention_workers, self.layout.micro_batches), len(chunks))
        return [chunks[i::count] for i in range(count)]

    def run(self, trace: list[TraceRequest], saturate: bool = False,
            on_step: Callable[[StepPlan], None] | None = None) -> SimResult:
        """Replay `trace` (module doc); `on_step` sees every plan the scheduler makes (tests)."""
        if saturate:
            count, n = max(len(trace), 4 * self.layout.max_batch_size), len(trace)
            span = 1 + max((h for r in trace for h in r.hash_ids), default=-1)
            trace = [TraceRequest(0.0, trace[i % n].input_len, trace[i % n].output_len,
                                  tuple(h + i // n * span for h in trace[i % n].hash_ids)) for i in range(count)]
        scheduler = self.scheduler()
        replays = [Replayed(r) for r in trace]
        arrivals = sorted(range(len(trace)), key=lambda i: (trace[i].arrival_s, i))
        next_arrival = 0
        prompts: dict[int, list[int]] = {}   # one placeholder prompt per length, shared: never written
        no_sampling = torch.Generator()      # every Request wants one; nothing samples here
        now, steps, batch_sum, max_batch, generated, completed = 0.0, 0, 0, 0, 0, 0
        warmup = min(self.layout.max_batch_size, len(replays) // 4) if saturate else 0
        window_start: tuple[float, int] | None = None if saturate else (0.0, 0)
        window_end: tuple[float, int] | None = None
        while next_arrival < len(arrivals) or scheduler.has_work():
            while next_arrival < len(arrivals) and trace[arrivals[next_arrival]].arrival_s <= now:
                index = arrivals[next_arrival]
                next_arrival += 1
                replay, n = replays[index], trace[index].input_len
                if self.prefix_caching:
                    prompt = prefix_prompt(trace[index].hash_ids, n, index)
                else:
                    prompt = prompts.setdefault(n, [0] * n)
                request = Request(index, prompt,
                                  SamplingParams(max_tokens=trace[index].output_len, ignore_eos=True),
                                  generator=no_sampling)
                try:
                    scheduler.add(request)
                except ValueError:  # Scheduler.check_fits: the engine refuses it
                    replay.outcome = "rejected" if n >= self.max_model_len else "rejected_kv"
                    continue
                replay.request = request
            if not scheduler.has_work():
                if next_arrival < len(arrivals):
                    now = max(now, trace[arrivals[next_arrival]].arrival_s)
                continue
            was_waiting = bool(scheduler.waiting)
            plan = scheduler.schedule()
            if on_step is not None:
                on_step(plan)
            ended = scheduler.take_ended()
            for request in ended:
                replay = replays[request.request_id]
                replay.outcome, replay.finish_s = "kv_capacity", now
            completed += len(ended)
            if not plan.micro_batches:
                assert ended, "the engine's scheduler planned nothing while requests wait"
                continue
            sampled = [replays[c.request_id] for c in plan.sampled_chunks]
            decoded = sum(r.generated + 1 for r in sampled)
            now += self.costs.step_time(self.work(plan), len(sampled), decoded)
            steps += 1
            rows = sum(len(mb.chunks) for mb in plan.micro_batches)
            batch_sum += rows
            max_batch = max(max_batch, rows)
            for replay in sampled:  # the driver's read-back: a token each, and its stop rule
                request = replay.request
                request.output_token_ids.append(0)
                if replay.first_token_s is None:
                    replay.first_token_s = now
                produced = len(request.output_token_ids)
                if reaches_length(produced, request.num_tokens, request.params.max_tokens, self.max_model_len):
                    scheduler.finish(request, "length")
                    replay.outcome = "length" if produced >= replay.trace.output_len else "context"
                    replay.finish_s = now
                    completed += 1
            generated += len(sampled)
            if saturate:
                if window_start is None and completed >= warmup:
                    window_start = (now, generated)
                if was_waiting and window_start is not None:
                    window_end = (now, generated)
        return self._result(replays, now, steps, batch_sum, max_batch, generated, scheduler.num_preemptions,
                            saturate, window_start, window_end)

    def _result(self, replays, now, steps, batch_sum, max_batch, generated, preemptions, saturate,
                window_start, window_end):
        finished = [r for r in replays if r.outcome in FINISHED]
        saturated = None
        if saturate:
            saturated = window_start is not None and window_end is not None and window_end[0] > window_start[0]
        if saturated:
            (t0, g0), (t1, g1) = window_start, window_end
            inside = [r for r in finished if r.first_token_s is not None and r.trace.arrival_s <= t1
                      and r.finish_s <= t1 and r.first_token_s >= t0]
            measured = inside if len(inside) >= 10 else finished
            duration, output_tokens = t1 - t0, g1 - g0
            done_in_window = [r for r in finished if t0 < r.finish_s <= t1]
        else:
            start = min((r.trace.arrival_s for r in replays), default=0.0)
            measured, duration, output_tokens, done_in_window = finished, now - start, generated, finished
        measured = [r for r in measured if r.first_token_s is not None]
        hit_rate = None
        if self.prefix_caching:
            served = [r for r in done_in_window if r.request is not None]
            hit_rate = sum(r.request.cached_tokens for r in served) / \
                max(sum(r.trace.input_len for r in served), 1)
        tpot = [(r.finish_s - r.first_token_s) / (r.generated - 1) for r in measured if r.generated > 1]
        outcomes = [r.outcome for r in replays]
        return SimResult(
            layout=self.layout, num_blocks=self.num_blocks, requests=len(replays), completed=len(done_in_window),
            rejected=outcomes.count("rejected"), rejected_kv=outcomes.count("rejected_kv"),
            kv_capacity=outcomes.count("kv_capacity"), truncated=outcomes.count("context"),
            duration_s=duration, output_tokens=output_tokens,
            input_tokens=sum(r.trace.input_len for r in done_in_window), steps=steps,
            mean_batch=batch_sum / steps if steps else 0.0, max_batch=max_batch, preemptions=preemptions,
            saturated=saturated, ttft_s=summarize([r.first_token_s - r.trace.arrival_s for r in measured]),
            tpot_s=summarize(tpot), e2e_s=summarize([r.finish_s - r.trace.arrival_s for r in measured]),
            prefix_hit_rate=hit_rate,
            ttft_by_request=[None if r.first_token_s is None else r.first_token_s - r.trace.arrival_s for r in replays],
            cached_by_request=[r.request.cached_tokens if r.request is not None else 0 for r in replays])


def simulate(trace: list[TraceRequest], layout: Layout, shape: ModelShape, model_costs: CostTable,
             attention_costs: CostTable | None, num_blocks: int, max_model_len: int | None = None,
             saturate: bool = False, decode_only: bool = False, link: Link | None = None,
             prefix_caching: bool = False, host_blocks: int = 0) -> SimResult:
    """`link`: the model-attention network (None: the attention table's `network` curve);
    `prefix_caching`, `host_blocks`: the engine's prefix cache and its host tier (module doc)."""
    layout.check(shape)
    costs = StepCostModel(layout, shape, model_costs, attention_costs or model_costs, link)
    return EngineSimulator(costs, num_blocks, max_model_len, decode_only, prefix_caching,
                           host_blocks).run(trace, saturate)


def prefix_prompt(hash_ids: tuple[int, ...], length: int, index: int) -> list[int]:
    """Placeholder token ids that share exactly what the trace shares: block i of the prompt
    is `hash_ids[i]` repeated (the engine's chained block keys tell equal prefixes only), and
    what the ids do not cover is the request's own (-1 - index: never an id)."""
    prompt: list[int] = []
    for i in range(-(-length // TRACE_BLOCK)):
        prompt += [hash_ids[i] if i < len(hash_ids) else -1 - index] * min(TRACE_BLOCK, length - len(prompt))
    return prompt
