"""Colocated decode steps replayed from CUDA graphs (model workers on a GPU).

A decode step of a small batch is a few hundred small kernels per layer-stack, and their
Python and launch overhead, not the GPU, sets the step time. `DecodeGraphs` captures the
whole forward of a decode-only micro-batch (embedding, every layer with its paged attention,
LM head: the pipeline loop of pipeline.py over the local channel, one micro-batch) once per
batch-size bucket, over static input tensors; a step then copies its token ids, positions,
cache slots, block tables (gathered on the device from the rank's block-table mirror,
worker/block_tables.py) and context lengths into them and replays the graph. The inputs
are built on the host already padded to the bucket (rows beyond the real batch point at a
scratch KV block that the block manager never hands out, so padding never touches a
request's cache) and copied with one transfer. Decode tokens fed from the previous step's
sampled tokens (asynchronous scheduling) are copied in on the device.

The static tensors are allocated once at the largest bucket and the graphs of smaller
buckets use leading views of them; the logits of every bucket land in one static buffer,
which `run` returns a view of (the caller samples from it before the next replay, in stream
order). The graphs hold the cache's addresses, so they are captured after the cache is
allocated, at start-up; the worker factory first captures them once on a tiny cache to learn
their memory (worker/memory.py).

Used only when the layout is colocated, the device is CUDA and the plan is one micro-batch
of decode tokens; other steps take the stage graphs (stage_graphs.py) or the eager path. At
TP > 1 the graph holds the TP all-reduces and the LM head's gather (NCCL captured): every TP
rank gets the same plan, so all of them capture and replay the same bucket at the same step.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import numpy as np
import torch

from megatron_lamina.attention.gpu import PagedAttention, PagedBatchIndex
from megatron_lamina.attention.kv_cache import slots_of
from megatron_lamina.worker.block_tables import ChunkTables
from megatron_lamina.worker.pipeline import EagerStages, run_pipeline
from megatron_lamina.worker.step_inputs import MicroBatchInputs
from megatron_lamina.host_to_device import HostArrays, to_device
from megatron_lamina.model.llama import LlamaModel
from megatron_lamina.plan import StepPlan
from megatron_lamina.transport.channel import LocalChannel


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for (a step pads to the next one): 1, 2, 4, 8, then
    every 16 rows, and `max_batch` itself."""
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 16, 16))
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


class DecodeGraphs:
    @torch.inference_mode()  # static inference tensors, like the steps' (one kind for the compiled kernels)
    def __init__(self, model: LlamaModel, attention: PagedAttention, max_batch: int, max_blocks: int,
                 scratch_block: int, pool=None):
        self.model, self.attention = model, attention
        self.max_blocks, self.scratch_block = max_blocks, scratch_block
        self.block_size = attention.cache.block_size
        self.sizes = batch_buckets(max_batch)
        self.pool = pool
        n, device = self.sizes[-1], model.device
        self.tokens = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), scratch_block * self.block_size, dtype=torch.long, device=device)
        self.tables = torch.full((n, max_blocks), scratch_block, dtype=torch.long, device=device)
        self.lens = torch.ones(n, dtype=torch.long, device=device)
        self.logits = torch.zeros(n, model.arch.vocab_size, dtype=model.embedding.word_embeddings.weight.dtype,
                                  device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def can_run(self, plan: StepPlan) -> bool:
        if len(plan.micro_batches) != 1:
            return False
        mb = plan.micro_batches[0]
        return (len(mb.chunks) <= self.sizes[-1] and mb.decode_only
                and all(len(c.block_table) <= self.max_blocks for c in mb.chunks))

    def run(self, plan: StepPlan, fed: torch.Tensor | None, table_writes: HostArrays) -> torch.Tensor:
        """Logits [rows, vocab]: a view of the static logits buffer, valid until the next replay.
        `table_writes`: this step's writes of the block-table mirror (BlockTables.apply)."""
        chunks = plan.micro_batches[0].chunks
        n = len(chunks)
        size = next(s for s in self.sizes if s >= n)
        bs, scratch = self.block_size, self.scratch_block
        # The rows' tables are gathered on the device from the block-table mirror
        # (worker/block_tables.py). Only the columns in use are written: the kernel never reads
        # a table entry past a row's context length. A padding row (context 1) reads only its
        # first entry, which points at the scratch block its k, v are written to.
        tables = ChunkTables.of(chunks, scratch)
        positions = np.zeros(size, np.int64)
        positions[:n] = np.fromiter((c.start for c in chunks), np.int64, n)
        tokens = np.zeros(size, np.int64)
        tokens[:n] = np.fromiter((c.tokens[0] for c in chunks), np.int64, n)
        slots = np.full(size, scratch * bs, np.int64)
        slots[:n] = slots_of(tables.blocks_at(positions[:n] // bs), positions[:n], bs)
        arrays = {"tokens": tokens, "positions": positions, "slots": slots, "lens": positions + 1,
                  **tables.host_arrays("tables")}
        feeds = [(row, c.feed) for row, c in enumerate(chunks) if c.feed >= 0]
        if feeds:
            arrays["feed"] = np.asarray(feeds, np.int64).T
        _, t = to_device([table_writes, HostArrays(arrays)], self.tokens.device)
        self.tokens[:size].copy_(t["tokens"])
        self.positions[:size].copy_(t["positions"])
        self.slots[:size].copy_(t["slots"])
        self.tables[:n, :tables.width].copy_(tables.on_device(t, "tables"))
        self.tables[n:size, 0] = scratch
        self.lens[:size].copy_(t["lens"])
        if feeds:
            self.tokens.index_copy_(0, t["feed"][0], fed.index_select(0, t["feed"][1]))
        self.graphs[size].replay()
        return self.logits[:n]

    def forward(self, size: int) -> None:
        """The step of bucket `size` over the static tensors: what its graph captures."""
        index = PagedBatchIndex(self.slots[:size], None, self.tables[:size], self.lens[:size],
                                self.max_blocks * self.block_size, None)
        inputs = MicroBatchInputs(size, self.tokens[:size], self.positions[:size], None)
        [logits] = run_pipeline(EagerStages(self.model), LocalChannel(self.attention), [inputs], [index],
                                self.model.num_layers)
        self.logits[:size].copy_(logits)

    @torch.inference_mode()
    def capture(self, progress: Callable[[str], None] = lambda _: None) -> None:
        """Capture every bucket, largest first (the smaller ones reuse its pool memory)."""
        started = time.monotonic()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            forward = functools.partial(self.forward, size)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks its kernels
                    forward()
            torch.cuda.current_stream().wait_stream(side)
            self.graphs[size] = graph = torch.cuda.CUDAGraph()
            # thread_local: other threads' CUDA calls (NCCL's watchdog polling its events) must
            # not invalidate the capture.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                forward()
        progress(f"decode graphs: {len(self.sizes)} batch buckets in {time.monotonic() - started:.1f} s")
