"""The host side of a decode step on the CPU, before and after issue 24 (tools/bench_host_step.py).

Three pieces of per-step host work, each timed as it ran before and as it runs now, on the
same inputs:
  * the sampler over `rows` decode rows: greedy; the default request (temperature 1.0, no
    seed) with a generator per row, one `exponential_` each (before); the same rows with no
    generator, one batched draw (now);
  * the padded block tables of `batch` decode rows at `context` tokens: copied from each
    chunk's Python list (before); now the host sends only the rows of a `BlockTables` array
    that the plans' deltas filled, to be gathered from its device mirror on the device, and
    reads each row's newest block for its cache slot, with the per-step `apply` of a plan
    that adds no block timed on its own;
  * a plan of `batch` decode requests through the control plane, without the transport:
    pickled and unpickled as `broadcast_object_list` does (before); encoded to integer columns,
    decoded, and every chunk made back from the columns, as a model worker that receives it
    reads them all (now);
  * a whole decode step's host work in a layout (`whole_step_ms`): the real `Scheduler` and
    `BlockManager` run `batch` requests at `context` tokens, decode steps only; the driver
    schedules and sends the plan, a receiving cache-holding rank receives it (the columns
    sliced: "plan"), makes the chunks it serves, applies them to its block tables and builds
    its attention index (`PagedAttention.host_index`'s numpy
    work: no model, no copy to a device; the device's part, the mirror's writes and the
    tables' gather, runs untimed on the CPU so that the test can compare the tables). Before: the plan pickled and unpickled, the tables
    kept as Python lists and the index built as it was at 8dfc72f^ (`_host_index_before`).
    Python's garbage collector runs as the engine sets it once started (`runtime.quiet_gc`),
    before with Python's defaults.
Every figure is the median time of one call (one step) in ms: wall time, except the whole
step's, which is the thread's CPU time (`time.thread_time`): the dev box is shared, and wall
time also counts the turns other processes take on its cores (nothing in a step waits).
"""

from __future__ import annotations

import gc
import pickle
import time
from typing import Callable

import numpy as np
import torch

from megatron_lamina.attention.gpu import PagedAttention
from megatron_lamina.attention.kv_cache import PagedKVCache, chunk_slots, padded_block_tables
from megatron_lamina.bench.timing import wall_s
from megatron_lamina.worker import plan_columns
from megatron_lamina.bench.timing import median
from megatron_lamina.driver.block_manager import BlockManager
from megatron_lamina.worker.block_tables import BlockTables, ChunkTables
from megatron_lamina.driver.request import Request
from megatron_lamina.driver.sampling import sample_tokens
from megatron_lamina.requests.sampling_params import SamplingParams
from megatron_lamina.driver.scheduler import Scheduler
from megatron_lamina.worker.runtime import quiet_gc
from megatron_lamina.host_to_device import to_device
from megatron_lamina.plan import MicroBatch, SequenceChunk, StepPlan

CPU = torch.device("cpu")


def _ms(fn, repeats: int) -> float:
    return 1e3 * wall_s(lambda _: fn(), CPU, warmup=max(2, repeats // 10), repeats=repeats)


def sampler_ms(rows: int, vocab: int, repeats: int) -> dict[str, float]:
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))
    greedy = [SamplingParams(temperature=0)] * rows
    default = [SamplingParams()] * rows
    per_row = [torch.Generator().manual_seed(i) for i in range(rows)]
    return {"greedy": _ms(lambda: sample_tokens(logits, greedy, [None] * rows), repeats),
            "before": _ms(lambda: sample_tokens(logits, default, per_row), repeats),
            "after": _ms(lambda: sample_tokens(logits, default, [None] * rows), repeats)}


def decode_step(batch: int, context: int, block_size: int) -> StepPlan:
    """`batch` decode rows at `context` tokens, request i on blocks [i * b, (i + 1) * b)."""
    per = -(-(context + 1) // block_size)
    return StepPlan([MicroBatch([SequenceChunk(i, 0, context, [3], [], True, feed=i,
                                               block_table=list(range(i * per, (i + 1) * per)))
                                 for i in range(batch)])])


def block_tables_ms(batch: int, context: int, block_size: int, repeats: int) -> dict[str, float]:
    plan = decode_step(batch, context, block_size)
    chunks = plan.micro_batches[0].chunks
    lists = [c.block_table for c in chunks]
    first = StepPlan([MicroBatch([SequenceChunk(c.request_id, 0, c.start, c.tokens, list(c.block_table), True)
                                  for c in chunks])])
    tables = BlockTables(rows=batch, max_blocks=len(lists[0]))
    to_device([tables.apply(first)], CPU)  # the plans before: every block announced once
    applied = first.micro_batches[0].chunks
    steady = StepPlan([MicroBatch([SequenceChunk(c.request_id, 0, c.start, c.tokens, [], True) for c in chunks])])
    positions = np.fromiter((c.start for c in applied), np.int64, len(applied))

    def after():  # what travels: the rows to gather on the device, and each row's newest block
        rows = ChunkTables.of(applied)
        return rows.host_arrays("tables"), rows.blocks_at(positions // block_size)

    return {"before": _ms(lambda: padded_block_tables(lists, 0), repeats),
            "after": _ms(after, repeats),
            "apply": _ms(lambda: tables.apply(steady), repeats)}


def plan_ms(batch: int, context: int, repeats: int) -> dict[str, float]:
    plan = decode_step(batch, context, 16)
    for c in plan.micro_batches[0].chunks[::16]:
        c.new_blocks = [c.block_table[-1]]  # about one request in 16 crosses a block boundary
    return {"before": _ms(lambda: pickle.loads(pickle.dumps(plan)), repeats),
            "after": _ms(lambda: [mb.chunks for mb in plan_columns.decode(plan_columns.encode(plan)).micro_batches],
                         repeats)}


# A layout's control plane and cache-holding receiver: (request shards, micro-batches), as the
# shipped GPU configs run them. Colocated (configs/gpu-colocated.yaml, TP 2): the second model
# worker receives every plan and holds every request's cache. Disaggregated
# (configs/gpu-disaggregated.yaml): the driver holds no cache; each of the 2 attention ranks
# receives every plan and indexes its own shard's rows.
DEFAULT_GC = (700, 10, 10)  # Python's own thresholds, as the engine ran before `quiet_gc`
LAYOUTS = {"colocated": (1, 1), "disaggregated": (2, 2)}


class _ListTables:
    """The block tables of a receiving rank before issue 24 (8dfc72f^): a list per request."""

    def __init__(self, shard: int | None):
        self.shard, self.tables = shard, {}

    def apply(self, plan: StepPlan) -> None:
        for request_id in plan.released:
            self.tables.pop(request_id, None)
        for mb in plan.micro_batches:
            for chunk in mb.chunks:
                if self.shard is None or chunk.shard == self.shard:
                    table = self.tables.setdefault(chunk.request_id, [])
                    table.extend(chunk.new_blocks)
                    chunk.block_table = table


def _host_index_before(chunks: list[SequenceChunk], bs: int) -> dict[str, np.ndarray]:
    """`PagedAttention.host_index`'s arrays as it built them before issue 24 (8dfc72f^)."""
    slots, decode_rows, tables, lens, prefill, row = [], [], [], [], [], 0
    for chunk in chunks:
        if len(chunk.tokens) == 1:
            p = chunk.start
            slots.append(np.array([chunk.block_table[p // bs] * bs + p % bs]))
            decode_rows.append(row)
            tables.append(chunk.block_table)
            lens.append(chunk.end)
        else:
            slots.append(chunk_slots(chunk.block_table, chunk.start, chunk.end, bs))
            prefill.append((row, chunk))
        row += len(chunk.tokens)
    arrays = {"new_slots": np.concatenate(slots) if slots else np.zeros(0, np.int64),
              "tables": padded_block_tables(tables, 0), "lens": np.asarray(lens, np.int64)}
    if len(decode_rows) != row:
        arrays["decode_rows"] = np.asarray(decode_rows, np.int64)
    return arrays


def running_scheduler(batch: int, context: int, block_size: int, shards: int, micro_batches: int,
                      steps: int, started: Callable[[], None] | None = None) -> tuple[Scheduler, StepPlan]:
    """A real scheduler with `batch` running requests whose contexts end within one block of
    `context` (staggered, so about one in `block_size` takes a new block each step), room for
    `steps` more tokens each, and the admitting (prefill) plan that announced their blocks.
    `started` runs once the block manager is built, where the engine's start-up ends."""
    per_request = -(-(context + steps + 1) // block_size)
    blocks = BlockManager(shards, -(-batch // shards) * per_request + 1, block_size)
    scheduler = Scheduler(blocks, batch, batch * context, micro_batches, context + steps + 1)
    if started is not None:
        started()
    params = SamplingParams(max_tokens=steps + block_size + 1)
    prompt = [1] * context  # shared: requests never write their prompts
    for i in range(batch):
        scheduler.add(Request(i, prompt[:context - i % block_size], params))
    return scheduler, scheduler.schedule()


def _read_back(scheduler: Scheduler) -> None:
    """What the engine does once a step's tokens are on the host: each request grows by one."""
    for request in scheduler.running:
        request.output_token_ids.append(1)


def whole_step_ms(layout: str, batch: int, context: int, block_size: int, repeats: int,
                  new: bool) -> dict[str, float | dict]:
    """Per decode step, median ms: `schedule` (driver), `plan` (driver's send + a receiver's
    receive), `index` (the receiver's apply + its index of every micro-batch it serves) and
    `step` (their sum per step: a receiver starts when the plan arrives). `new`: the code
    after issue 24, else before. `arrays`: the last step's index of the receiver's first
    micro-batch (the test compares the two paths)."""
    shards, micro_batches = LAYOUTS[layout]
    shard = None if shards == 1 else 0
    if not new:  # Python's collector as the engine left it before issue 24
        gc.unfreeze()
        gc.set_threshold(*DEFAULT_GC)
    warmup = max(2, repeats // 10)
    scheduler, admit = running_scheduler(batch, context, block_size, shards, micro_batches, warmup + repeats,
                                         quiet_gc if new else None)
    attention = PagedAttention(PagedKVCache(0, 1, block_size, 1, 1, torch.float32))
    tables = BlockTables(shard) if new else _ListTables(shard)
    writes = tables.apply(admit)
    if new:
        to_device([writes], CPU)
    del admit, writes  # the engine keeps no plan past its step (its prompts' token lists)
    _read_back(scheduler)
    times: dict[str, list[float]] = {"schedule": [], "plan": [], "index": [], "step": []}
    for _ in range(warmup + repeats):
        t0 = time.thread_time()
        plan = scheduler.schedule()
        t1 = time.thread_time()
        got = plan_columns.decode(plan_columns.encode(plan)) if new else pickle.loads(pickle.dumps(plan))
        t2 = time.thread_time()
        writes = tables.apply(got)
        mine = [mb.chunks if shard is None else mb.shard_chunks(shard) for mb in got.micro_batches]
        if new:
            indices = [attention.host_index(chunks) for chunks in mine if chunks]
        else:
            arrays = [_host_index_before(chunks, block_size) for chunks in mine if chunks]
        t3 = time.thread_time()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            times[key].append(1e3 * value)
        if new:  # the device's part, untimed (the CPU stands in): the mirror's writes, the gathers
            staged = to_device([writes, *indices], CPU)[1:]
            arrays = [index.arrays | {"tables": d.block_tables.numpy()} for index, d in zip(indices, staged)]
        _read_back(scheduler)
    chunks = [c for mb in plan.micro_batches for c in mb.chunks]
    assert len(chunks) == batch and all(len(c.tokens) == 1 for c in chunks), "not a decode step of every request"
    return {key: median(values[warmup:]) for key, values in times.items()} | {"arrays": arrays[0]}
