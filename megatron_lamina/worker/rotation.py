"""The staggered pipeline's order (DESIGN.md section 4): the one rule both roles follow.

A step's micro-batches travel through the layers together. Every attention exchange is a
(layer, micro-batch) pair; `exchange_order` lists them layer-major, micro-batch-minor, and
that list is the whole protocol between the roles:
  * a model worker posts exchange (l, j) (sends q, k, v) right after it finished exchange
    (l-1, j) (received o) and ran the stage in between, and it finishes exchanges in the
    same order, so its sends and its receives both follow the list;
  * an attention worker serves the exchanges in the list's order (receive, attend, reply),
    skipping the micro-batches with no rows on its shard, as the model side sends nothing
    to a shard without rows.
While the attention of (l, j) is away, the model worker computes the stages of the
micro-batches after j: that is the overlap. Every executor (eager stages, stage graphs, the
colocated whole-step graph, the attention worker's loop) walks this list, so the order is
written once; a mismatch between two ranks would be a deadlock, which is why nothing here
may depend on timing.
"""

from __future__ import annotations


def exchange_order(num_micro_batches: int, num_layers: int) -> list[tuple[int, int]]:
    """(layer, micro-batch) of every attention exchange of a step, in posting order."""
    return [(layer, j) for layer in range(num_layers) for j in range(num_micro_batches)]
