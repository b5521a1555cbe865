"""The model worker's stages replayed from CUDA graphs: piecewise graphs at token buckets.

An eager step spends its time in Python and kernel launches (host time per micro-batch
and step that grows with the layers, docs/BENCHMARKS.md), not on the GPU. What lies between two attention calls
is pure model compute and can be captured: the stages of `LlamaModel` (llama.py) — stage 0
= embedding, RoPE tables, layer 0's pre-attention; stage l = layer l-1's post-attention and
layer l's pre-attention; stage L = the last post-attention. `StageGraphs` captures every
stage once per (token bucket, micro-batch slot); attention runs eagerly between replays,
through the channel (the attention workers, or the local paged cache with the decode and
prefill kernels), as vLLM's piecewise graphs do. A step of decode rows, prefill chunks or
both replays them: its micro-batch pads to the next bucket; only the real rows go to
attention, padding rows are computed and never leave the GPU. The head (final norm and LM
head over the sampled rows) runs eagerly after the last stage: the sampled rows of a mixed
step are a few of its tokens.

Micro-batches of one step are in flight together, so every slot has its own static tensors
(`_Slot`): token ids, positions, RoPE tables, the residual stream, the attention output, q,
k, v and the last stage's hidden states, allocated once at the largest bucket; the graphs of
smaller buckets read and write leading views of them. A graph reads and writes only these
(plus temporaries), so every graph shares one memory pool, captured largest first so the
smaller ones reuse its memory. Everything is captured at start-up (`capture`), never while
serving.

At TP > 1 a stage holds its row-parallel all-reduces (NCCL captured in the graph): every TP
rank gets the same plan, so all of them replay the same graphs in the same order, as they
would run the eager collectives.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from megatron_lamina.worker.step_inputs import MicroBatchInputs
from megatron_lamina.model.llama import LlamaModel
from megatron_lamina.plan import StepPlan


def token_buckets(max_tokens: int) -> list[int]:
    """The token counts graphs are captured for (a micro-batch pads to the next one): 1, 2, 4,
    8, every 16 up to 256, every 64 up to 1024, every 256 beyond, and `max_tokens` itself."""
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(320, 1025, 64)) + \
        list(range(1280, max_tokens + 256, 256))
    return sorted({s for s in sizes if s <= max_tokens} | {max_tokens})


class _Slot:
    """One micro-batch slot: static tensors at the largest bucket, and its graphs per bucket.
    The tensors are inference tensors, like everything the steps compute (inference mode):
    the compiled kernels then see one kind of tensor and are not recompiled per kind."""

    @torch.inference_mode()
    def __init__(self, model: LlamaModel, size: int):
        arch, cfg, device = model.arch, model.config, model.device
        dtype = model.embedding.word_embeddings.weight.dtype
        tp = model.tp_group.size()  # this rank's heads: its TP shard
        heads, kv_heads, d = cfg.num_attention_heads // tp, cfg.num_query_groups // tp, arch.head_dim
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.cos = torch.zeros(size, 1, 1, d, dtype=dtype, device=device)
        self.sin = torch.zeros(size, 1, 1, d, dtype=dtype, device=device)
        self.residual = torch.zeros(size, 1, arch.hidden_size, dtype=dtype, device=device)
        self.hidden = torch.zeros(size, 1, arch.hidden_size, dtype=dtype, device=device)
        self.attention_out = torch.zeros(size, heads, d, dtype=dtype, device=device)
        self.q = torch.zeros(size, heads, d, dtype=dtype, device=device)
        self.k = torch.zeros(size, kv_heads, d, dtype=dtype, device=device)
        self.v = torch.zeros(size, kv_heads, d, dtype=dtype, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}  # bucket -> one graph per stage

    def run_stage(self, model: LlamaModel, stage: int, s: int) -> None:
        """Stage `stage` over the first `s` rows of the static tensors (what each graph captures)."""
        if stage == 0:
            residual, cos, sin, q, k, v = model.first_stage(self.tokens[:s], self.positions[:s])
            self.cos[:s].copy_(cos)
            self.sin[:s].copy_(sin)
        elif stage < model.num_layers:
            residual, q, k, v = model.middle_stage(stage, self.residual[:s], self.attention_out[:s],
                                                   self.cos[:s], self.sin[:s])
        else:
            self.hidden[:s].copy_(model.last_stage(self.residual[:s], self.attention_out[:s]))
            return
        self.residual[:s].copy_(residual)
        self.q[:s].copy_(q)
        self.k[:s].copy_(k)
        self.v[:s].copy_(v)


class StageGraphs:
    def __init__(self, model: LlamaModel, max_tokens: int, slots: int, pool=None, sizes: list[int] | None = None):
        """`max_tokens`: the largest micro-batch (token rows) to capture; `slots`: the most
        micro-batches of one step (scheduler.micro_batches); `pool`: the graph memory pool,
        shared with the worker's other graphs; `sizes`: the buckets (default `token_buckets`,
        a profiler times one at a time)."""
        self.model = model
        self.sizes = sorted(sizes) if sizes else token_buckets(max_tokens)
        self.slots = [_Slot(model, self.sizes[-1]) for _ in range(slots)]
        self.pool = pool

    def can_run(self, plan: StepPlan) -> bool:
        mbs = plan.micro_batches
        return 0 < len(mbs) <= len(self.slots) and all(mb.num_rows <= self.sizes[-1] for mb in mbs)

    def bucket(self, rows: int) -> int:
        return next(s for s in self.sizes if s >= rows)

    @torch.inference_mode()
    def capture(self, progress: Callable[[str], None] = lambda _: None) -> None:
        """Capture every stage of every bucket and slot, largest bucket first."""
        model, stages = self.model, range(self.model.num_layers + 1)
        started = time.monotonic()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        for i, size in enumerate(reversed(self.sizes)):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: kernels compile, cuBLAS picks its own, lazy init
                for stage in stages:
                    self.slots[0].run_stage(model, stage, size)
            torch.cuda.current_stream().wait_stream(side)
            for slot in self.slots:
                slot.graphs[size] = graphs = [torch.cuda.CUDAGraph() for _ in stages]
                for stage in stages:
                    # thread_local: other threads' CUDA calls (NCCL's watchdog polling its
                    # events) must not invalidate the capture.
                    with torch.cuda.graph(graphs[stage], pool=self.pool, capture_error_mode="thread_local"):
                        slot.run_stage(model, stage, size)
            if i % 8 == 7 or size == self.sizes[0]:
                progress(f"stage graphs: {i + 1}/{len(self.sizes)} token buckets "
                         f"({len(self.slots)} slot(s) x {len(stages)} stages) in {time.monotonic() - started:.1f} s")

    def stages(self) -> "GraphStages":
        return GraphStages(self)


class GraphStages:
    """One step's `Stages` (pipeline.py) over the captured graphs: micro-batch j uses slot j."""

    def __init__(self, graphs: StageGraphs):
        self.graphs, self.model = graphs, graphs.model
        self.rows: dict[int, tuple[int, int, torch.Tensor | None]] = {}  # j -> (rows, bucket, sample rows)

    def first(self, j: int, inputs: MicroBatchInputs):
        slot, n = self.graphs.slots[j], inputs.num_rows
        size = self.graphs.bucket(n)
        self.rows[j] = (n, size, inputs.sample_rows)
        slot.tokens[:n].copy_(inputs.token_ids)
        slot.positions[:n].copy_(inputs.positions)
        if size > n:  # padding rows: any valid token at position 0
            slot.tokens[n:size].zero_()
            slot.positions[n:size].zero_()
        slot.graphs[size][0].replay()
        return slot.q[:n], slot.k[:n], slot.v[:n]

    def middle(self, j: int, layer: int, attention_out: torch.Tensor):
        slot, (n, size, _) = self.graphs.slots[j], self.rows[j]
        slot.attention_out[:n].copy_(attention_out)
        slot.graphs[size][layer].replay()
        return slot.q[:n], slot.k[:n], slot.v[:n]

    def last(self, j: int, attention_out: torch.Tensor) -> torch.Tensor:
        slot, (n, size, rows) = self.graphs.slots[j], self.rows.pop(j)
        slot.attention_out[:n].copy_(attention_out)
        slot.graphs[size][-1].replay()
        hidden = slot.hidden[:n]
        return self.model.head(hidden if rows is None else hidden[rows])
