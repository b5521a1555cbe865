"""The host side of a decode step on the CPU, before and after issue 24 (tools/bench_host_step.py).

Three pieces of per-step host work, each timed as it ran before and as it runs now, on the
same inputs:
  * the sampler over `rows` decode rows: greedy; the default request (temperature 1.0, no
    seed) with a generator per row, one `exponential_` each (before); the same rows with no
    generator, one batched draw (now);
  * the padded block tables of `batch` decode rows at `context` tokens: copied from each
    chunk's Python list (before); one gather of the rows of a `BlockTables` array that the
    plans' deltas filled (now), with the per-step `apply` of a plan that adds no block timed
    on its own;
  * a plan of `batch` decode requests through the control plane, without the transport:
    pickled and unpickled as `broadcast_object_list` does (before); encoded to integer columns
    and decoded (now).
Every figure is the median wall time of one call in ms.
"""

from __future__ import annotations

import pickle

import torch

from megatron_lamina.attention.kv_cache import padded_block_tables
from megatron_lamina.bench.timing import wall_s
from megatron_lamina.engine import plan_columns
from megatron_lamina.engine.block_tables import BlockTables, padded_tables
from megatron_lamina.engine.sampling import SamplingParams, sample_tokens
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
    tables.apply(first)  # the plans before: every block announced once
    applied = first.micro_batches[0].chunks
    steady = StepPlan([MicroBatch([SequenceChunk(c.request_id, 0, c.start, c.tokens, [], True) for c in chunks])])
    return {"before": _ms(lambda: padded_block_tables(lists, 0), repeats),
            "after": _ms(lambda: padded_tables(applied, 0), repeats),
            "apply": _ms(lambda: tables.apply(steady), repeats)}


def plan_ms(batch: int, context: int, repeats: int) -> dict[str, float]:
    plan = decode_step(batch, context, 16)
    for c in plan.micro_batches[0].chunks[::16]:
        c.new_blocks = [c.block_table[-1]]  # about one request in 16 crosses a block boundary
    return {"before": _ms(lambda: pickle.loads(pickle.dumps(plan)), repeats),
            "after": _ms(lambda: plan_columns.decode(plan_columns.encode(plan)), repeats)}
