"""Every cache-holding rank's own copy of the block tables, kept from the plans' deltas.

The driver's block manager owns the tables; a plan carries only what changed (each chunk's
`new_blocks`, and the requests whose blocks were `released`), so nothing proportional to the
context length crosses the control plane every step (plan.py). A rank that holds a cache (an
attention worker, a colocated model worker other than the driver) applies each plan to its
`BlockTables` before running it, which fills in `chunk.block_table` for the chunks it serves.
"""

from __future__ import annotations

from megatron_lamina.plan import StepPlan


class BlockTables:
    def __init__(self, shard: int | None = None):
        """`shard`: keep only that request shard's tables (an attention worker); None: all."""
        self.shard = shard
        self.tables: dict[int, list[int]] = {}

    def apply(self, plan: StepPlan) -> None:
        for request_id in plan.released:
            self.tables.pop(request_id, None)
        for mb in plan.micro_batches:
            for chunk in mb.chunks:
                if self.shard is None or chunk.shard == self.shard:
                    table = self.tables.setdefault(chunk.request_id, [])
                    table.extend(chunk.new_blocks)
                    chunk.block_table = table
