"""Disaggregated decode steps with the model worker's stages replayed from CUDA graphs.

An eager disaggregated model worker spends its step in Python and kernel launches (~20 ms of
host time per micro-batch and step for an 8B model), not on the GPU. It cannot take the
colocated path's whole-step graph (cuda_graphs.py): attention runs on another rank, between
every two layers. What lies between two attention calls can be captured, though: the
stages of `LlamaModel` (llama.py) — stage 0 = embedding, RoPE tables, layer 0's
pre-attention; stage l = layer l-1's post-attention and layer l's pre-attention; stage L =
the last post-attention, final norm and LM head. `StageGraphs` captures each stage once per
(batch-size bucket, micro-batch slot) and replays it; only the transport runs eagerly.

A step is the eager rotation (model_runner.py) with graph replays in place of the stage
code: for each stage l (layer-major), for each micro-batch j (minor): copy micro-batch j's
attention output of layer l-1 into its slot's static input (`finish`), replay stage l, hand
the slot's static q, k, v of layer l to the channel (`begin`). The begin/finish order is
exactly the eager one, which the attention workers (AttentionRunner) post their receives
in. Only the micro-batch's n real rows are sent and received; padding rows up to the
bucket size are computed and never leave the GPU.

Micro-batches of one step are in flight together, so every slot has its own static tensors
(`_Slot`): token ids, positions, RoPE tables, the residual stream, the attention-output
input, q, k, v. A stage reads and writes only these (plus its temporaries), so every graph
of every bucket and slot shares one memory pool. The slot owns every tensor a graph reads or
writes at replay: a tensor only the capture referenced would be freed and its memory reused.
The logits are the one output left in the pool; they are cloned right after stage L.

Used only on a disaggregated model worker on CUDA, for plans of decode tokens (every row
sampled) with at most `slots` micro-batches of at most `max_batch` rows; every other step
takes the eager path. At TP > 1 a stage holds its row-parallel all-reduces (NCCL captured in
the graph): every TP rank gets the same plan, so all of them replay the same graphs in the
same order, as they would run the eager collectives.
"""

from __future__ import annotations

import torch

from megatron_lamina.engine.cuda_graphs import batch_buckets
from megatron_lamina.model.llama import LlamaModel
from megatron_lamina.plan import StepPlan


class _Slot:
    """One micro-batch slot at one bucket size: its static tensors and its L + 1 graphs."""

    def __init__(self, model: LlamaModel, size: int, device):
        arch, cfg = model.arch, model.config
        dtype = model.embedding.word_embeddings.weight.dtype
        tp = model.tp_group.size()  # this rank's heads: its TP shard
        heads, kv_heads, d = cfg.num_attention_heads // tp, cfg.num_query_groups // tp, arch.head_dim
        self.size = size
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.cos = torch.zeros(size, 1, 1, d, dtype=dtype, device=device)
        self.sin = torch.zeros(size, 1, 1, d, dtype=dtype, device=device)
        self.residual = torch.zeros(size, 1, arch.hidden_size, dtype=dtype, device=device)
        self.attention_out = torch.zeros(size, 1, heads * d, dtype=dtype, device=device)
        self.q = torch.zeros(size, 1, heads, d, dtype=dtype, device=device)
        self.k = torch.zeros(size, 1, kv_heads, d, dtype=dtype, device=device)
        self.v = torch.zeros(size, 1, kv_heads, d, dtype=dtype, device=device)
        self.num_stages = arch.num_layers + 1
        self.graphs: list[torch.cuda.CUDAGraph] = []  # one per stage, filled by the capture
        self.logits: torch.Tensor | None = None  # stage L's output, in the graph pool

    def run_stage(self, model: LlamaModel, stage: int):
        """Stage `stage` of `model` over this slot's static tensors (what each graph captures)."""
        if stage == 0:
            residual, cos, sin, q, k, v = model.first_stage(self.tokens, self.positions)
            self.cos.copy_(cos)
            self.sin.copy_(sin)
        elif stage < self.num_stages - 1:
            residual, q, k, v = model.middle_stage(stage, self.residual, self.attention_out, self.cos, self.sin)
        else:
            return model.last_stage(self.residual, self.attention_out)  # decode: every row sampled
        self.residual.copy_(residual)
        self.q.copy_(q)
        self.k.copy_(k)
        self.v.copy_(v)
        return None


class StageGraphs:
    def __init__(self, model: LlamaModel, max_batch: int, slots: int):
        """`max_batch`: the largest micro-batch (rows) to capture; `slots`: the most
        micro-batches of one step (scheduler.micro_batches)."""
        self.model, self.slots = model, slots
        self.device = model.rotary.inv_freq.device
        self.sizes = batch_buckets(max_batch)
        self.captured: dict[tuple[int, int], _Slot] = {}  # (bucket size, slot) -> slot
        self.pool = None

    def can_run(self, plan: StepPlan) -> bool:
        mbs = plan.micro_batches
        return 0 < len(mbs) <= self.slots and all(
            0 < len(mb.chunks) <= self.sizes[-1] and all(len(c.tokens) == 1 and c.sample for c in mb.chunks)
            for mb in mbs
        )

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor:
        mbs = plan.micro_batches
        rows = [len(mb.chunks) for mb in mbs]
        slots = [self._slot(next(s for s in self.sizes if s >= n), j) for j, n in enumerate(rows)]
        for slot, mb, n in zip(slots, mbs, rows):
            slot.tokens[:n].copy_(mb.token_ids, non_blocking=True)
            slot.positions[:n].copy_(mb.positions, non_blocking=True)
            slot.tokens[n:] = 0  # padding rows: any valid token at position 0
            slot.positions[n:] = 0
        layers = self.model.decoder.layers
        pending: list = [None] * len(mbs)
        logits: list[torch.Tensor | None] = [None] * len(mbs)
        # The eager rotation (ModelRunner.run): stage-major, micro-batch-minor.
        for stage in range(len(layers) + 1):
            for j, (slot, mb, n) in enumerate(zip(slots, mbs, rows)):
                if stage > 0:
                    slot.attention_out[:n].copy_(layers[stage - 1].remote_attention.wait(pending[j]))
                slot.graphs[stage].replay()
                if stage < len(layers):
                    pending[j] = layers[stage].remote_attention.send(slot.q[:n], slot.k[:n], slot.v[:n], mb)
                else:
                    # Cloned before any other graph replays: the pool memory may be reused.
                    logits[j] = slot.logits[:n].clone()
        return torch.cat(logits)

    def _slot(self, size: int, index: int) -> _Slot:
        """The captured slot, capturing its L + 1 stages on first use."""
        if (size, index) not in self.captured:
            self.captured[size, index] = self._capture(size)
        return self.captured[size, index]

    def _capture(self, size: int) -> _Slot:
        slot = _Slot(self.model, size, self.device)
        stages = range(slot.num_stages)
        slot.graphs = [torch.cuda.CUDAGraph() for _ in stages]
        with self.model.fused_elementwise():  # compiled SwiGLU and RoPE inside the graphs
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: kernels compile, cuBLAS picks its own, lazy init
                    for stage in stages:
                        slot.run_stage(self.model, stage)
            torch.cuda.current_stream().wait_stream(side)
            for stage in stages:
                # thread_local: other threads' CUDA calls (NCCL's watchdog polling its events)
                # must not invalidate the capture.
                with torch.cuda.graph(slot.graphs[stage], pool=self.pool, capture_error_mode="thread_local"):
                    out = slot.run_stage(self.model, stage)
                self.pool = slot.graphs[stage].pool()
        slot.logits = out
        return slot
