"""Colocated decode steps replayed from CUDA graphs (model workers on a GPU).

A decode step of a small model is a few hundred small kernels per layer-stack, and their
Python and launch overhead, not the GPU, sets the step time. `DecodeGraphs` captures the
whole forward of a decode-only micro-batch (embedding, every layer with its paged attention,
LM head) once per batch-size bucket, over static input tensors; a step then copies its
token ids, positions, cache slots, block tables and context lengths into the bucket's
tensors and replays the graph. Rows beyond the real batch point at a scratch KV block that
the block manager never hands out, so padding never touches a request's cache.

Used only when the layout is colocated, the device is CUDA and the plan is one micro-batch
of decode tokens; every other step takes the eager path. At TP > 1 the graph holds the TP
all-reduces and the LM head's gather (NCCL captured): every TP rank gets the same plan, so
all of them capture and replay the same bucket at the same step.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_lamina.attention.gpu import PagedAttention, PagedBatchIndex
from megatron_lamina.attention.kv_cache import padded_block_tables
from megatron_lamina.model.llama import LlamaModel
from megatron_lamina.plan import MicroBatch, SequenceChunk, StepPlan


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for (a step pads to the next one): 1, 2, 4, 8, then
    every 16 rows, and `max_batch` itself."""
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 16, 16))
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


class _Bucket:
    def __init__(self, size: int, max_blocks: int, scratch_block: int, device):
        self.size = size
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slots = torch.zeros(size, dtype=torch.long, device=device)
        self.tables = torch.full((size, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self.lens = torch.ones(size, dtype=torch.int32, device=device)
        # Row indices 0..size-1 (decode rows, sampled rows): the graph reads them at replay, so
        # the bucket owns them (a tensor only the capture referenced would be freed and reused).
        self.rows = torch.arange(size, device=device)
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, model: LlamaModel, attention: PagedAttention, max_batch: int, max_blocks: int,
                 scratch_block: int, fuse_elementwise: bool = True):
        """`fuse_elementwise`: capture the compiled SwiGLU and RoPE kernels
        (`LlamaModel.fused_elementwise`); off only to measure what they save."""
        self.model, self.attention = model, attention
        self.fuse_elementwise = fuse_elementwise
        self.max_blocks, self.scratch_block = max_blocks, scratch_block
        self.block_size = attention.cache.block_size
        self.device = model.rotary.inv_freq.device
        self.sizes = batch_buckets(max_batch)
        self.buckets: dict[int, _Bucket] = {}
        self.pool = None

    def can_run(self, plan: StepPlan) -> bool:
        if len(plan.micro_batches) != 1:
            return False
        chunks = plan.micro_batches[0].chunks
        return (len(chunks) <= self.sizes[-1] and all(len(c.tokens) == 1 for c in chunks)
                and all(len(c.block_table) <= self.max_blocks for c in chunks))

    def run(self, plan: StepPlan) -> torch.Tensor:
        chunks = plan.micro_batches[0].chunks
        n = len(chunks)
        bucket = self._bucket(next(s for s in self.sizes if s >= n))
        # Only the columns in use are written: the kernel never reads a table entry past a
        # row's context length, so older entries further right are harmless. Built with numpy
        # (no tensor per row: at a thousand rows that was milliseconds of host time a step).
        tables = padded_block_tables([c.block_table for c in chunks], self.scratch_block)
        positions = np.fromiter((c.start for c in chunks), np.int64, n)
        blocks = tables[np.arange(n), positions // self.block_size].astype(np.int64)
        width = tables.shape[1]
        bucket.tokens[:n].copy_(torch.from_numpy(np.fromiter((c.tokens[0] for c in chunks), np.int64, n)))
        bucket.positions[:n].copy_(torch.from_numpy(positions))
        bucket.slots[:n].copy_(torch.from_numpy(blocks * self.block_size + positions % self.block_size))
        bucket.tables[:n, :width].copy_(torch.from_numpy(tables))
        bucket.lens[:n].copy_(torch.from_numpy((positions + 1).astype(np.int32)))
        self._reset_padding(bucket, n)
        bucket.graph.replay()
        return bucket.logits[:n].clone()

    def _reset_padding(self, bucket: _Bucket, n: int) -> None:
        bucket.tokens[n:] = 0
        bucket.positions[n:] = 0
        bucket.slots[n:] = self.scratch_block * self.block_size
        bucket.tables[n:, 0] = self.scratch_block  # with length 1 only column 0 is read
        bucket.lens[n:] = 1

    def _bucket(self, size: int) -> _Bucket:
        if size not in self.buckets:
            self.buckets[size] = self._capture(size)
        return self.buckets[size]

    def _capture(self, size: int) -> _Bucket:
        bucket = _Bucket(size, self.max_blocks, self.scratch_block, self.device)
        self._reset_padding(bucket, 0)
        chunks = [SequenceChunk(i, 0, 0, [0], [self.scratch_block], True) for i in range(size)]
        mb = MicroBatch(chunks)
        # The model reads these through MicroBatch's cached properties: point them at the
        # bucket's static tensors (already on the device, so no host copy is captured).
        mb.__dict__.update(token_ids=bucket.tokens, positions=bucket.positions, sample_rows=bucket.rows)
        index = PagedBatchIndex(bucket.slots, bucket.rows, bucket.tables, bucket.lens, [],
                                self.max_blocks * self.block_size)

        def forward() -> torch.Tensor:
            self.attention.pin_index(chunks, index)
            passes = self.model.forward_micro_batch(mb)
            try:
                while True:
                    next(passes)
            except StopIteration as done:
                return done.value

        with self.model.fused_elementwise(self.fuse_elementwise):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks its kernels
                    forward()
            torch.cuda.current_stream().wait_stream(side)
            # thread_local: other threads' CUDA calls (NCCL's watchdog polling its events) must
            # not invalidate the capture.
            with torch.cuda.graph(bucket.graph, pool=self.pool, capture_error_mode="thread_local"):
                bucket.logits = forward()
        self.pool = bucket.graph.pool()
        return bucket
