"""Synthetic cost tables: a roofline over datasheet numbers, for devices nobody has profiled.

Every time is max(FLOPs / (efficiency x peak FLOP/s), bytes / (efficiency x HBM bandwidth))
plus a fixed launch cost, with the efficiencies below (FP8 KV rows too: one byte per cached
element). They are ASSUMPTIONS, calibrated only
against the H100 numbers in DESIGN.md section 1 (bf16 GEMM at 77 % of peak, HBM copies at
89 % of bandwidth, a LLaMA-3-8B layer at batch 1 in 0.19 ms); a measured table from
tools/profile_costs.py replaces all of them. A table built here says "synthetic" in its `source`,
and `lamina plan` labels every result computed from it.
"""

from __future__ import annotations

from megatron_lamina.fp8 import FP8
from megatron_lamina.planner.cost_table import CostTable, Curve, Grid
from megatron_lamina.planner.devices import DeviceSpec
from megatron_lamina.planner.link import Link
from megatron_lamina.planner.shapes import ModelShape

GEMM_EFFICIENCY = 0.75       # of peak FLOP/s, large GEMMs
ATTENTION_FLOP_EFFICIENCY = 0.5   # of peak FLOP/s, attention kernels (prefill is compute-bound)
HBM_EFFICIENCY = 0.85        # of HBM bandwidth, weight and KV streaming
KERNEL_LAUNCH_S = 20e-6      # per layer, per side (a few kernels, no CUDA graphs)
ALLREDUCE_LATENCY_S = 10e-6  # per TP all-reduce (two per layer)
STEP_CPU_S = 1e-3            # per step: scheduling, plan broadcast, Python (driver)
STEP_CPU_PER_ROW_S = 10e-6   # per sampled row: plan entry, sampling

TOKENS = [2 ** i for i in range(17)]                       # 1 .. 65536
BATCH = [2 ** i for i in range(12)]                        # 1 .. 2048
CONTEXT = [16 * 4 ** i for i in range(8)] + [131072]       # 16 .. 262144 (sorted below)
PAIRS = [4 ** i for i in range(19)]                        # 1 .. 6.9e10
MESSAGE_BYTES = [4 ** i for i in range(16)]                # 1 B .. 1 GiB


def _roofline(flops: float, nbytes: float, device: DeviceSpec, flop_efficiency: float) -> float:
    return max(flops / (flop_efficiency * device.tflops * 1e12),
               nbytes / (HBM_EFFICIENCY * device.bandwidth_tbs * 1e12))


def ring_all_reduce_s(nbytes: float, tp: int, link_gbs: float) -> float:
    """One all-reduce of `nbytes` over `tp` GPUs as a ring: 2 (tp-1)/tp x nbytes over one
    link direction of `link_gbs` GB/s, plus ALLREDUCE_LATENCY_S; 0 for tp 1. Synthetic tables
    and tools/profile_costs.py --emulate-tp (the collectives an emulated TP rank does not run)."""
    if tp <= 1:
        return 0.0
    return ALLREDUCE_LATENCY_S + 2 * (tp - 1) / tp * nbytes / (link_gbs * 1e9)


def ring_all_gather_s(nbytes_per_rank: float, tp: int, link_gbs: float) -> float:
    """One all-gather of `nbytes_per_rank` from each of `tp` GPUs as a ring: (tp-1) x
    nbytes_per_rank over one link direction, plus ALLREDUCE_LATENCY_S; 0 for tp 1."""
    if tp <= 1:
        return 0.0
    return ALLREDUCE_LATENCY_S + (tp - 1) * nbytes_per_rank / (link_gbs * 1e9)


def synthetic_cost_table(shape: ModelShape, device: DeviceSpec, link: Link,
                         tp_sizes: list[int], dtype_bytes: int = 2) -> CostTable:
    matmul_params = shape.layer_params - 2 * shape.hidden_size
    head_params = shape.vocab_size * shape.hidden_size

    def layer(tp: int, tokens: int) -> float:
        t = _roofline(2 * matmul_params * tokens / tp, shape.layer_params * dtype_bytes / tp,
                      device, GEMM_EFFICIENCY) + KERNEL_LAUNCH_S
        # ring all-reduce after the attention output projection and after the MLP
        return t + 2 * ring_all_reduce_s(tokens * shape.hidden_size * dtype_bytes, tp, device.nvlink_gbs)

    def overhead(tp: int, rows: int) -> float:
        lm_head = _roofline(2 * head_params * rows / tp, head_params * dtype_bytes / tp, device, GEMM_EFFICIENCY)
        return lm_head + STEP_CPU_S + STEP_CPU_PER_ROW_S * rows

    flops_per_pair = 4 * shape.num_heads * shape.head_dim                      # QK^T and PV

    def decode(batch: int, context: int, kv_bytes: int = dtype_bytes) -> float:
        kv_bytes_per_token = 2 * shape.num_kv_heads * shape.head_dim * kv_bytes  # one layer
        return _roofline(flops_per_pair * batch * context, kv_bytes_per_token * batch * context,
                         device, ATTENTION_FLOP_EFFICIENCY) + KERNEL_LAUNCH_S

    def prefill(pairs: int) -> float:
        return flops_per_pair * pairs / (ATTENTION_FLOP_EFFICIENCY * device.tflops * 1e12) + KERNEL_LAUNCH_S

    context = sorted(set(CONTEXT))
    return CostTable(
        device=device.name,
        source=(f"synthetic: roofline from {device.name} datasheet numbers ({device.tflops:g} TFLOP/s, "
                f"{device.bandwidth_tbs:g} TB/s), not measured"),
        shape=shape, dtype={4: "float32", 2: "bfloat16"}[dtype_bytes],
        model_layer={tp: Curve([float(t) for t in TOKENS], [layer(tp, t) for t in TOKENS]) for tp in tp_sizes},
        step_overhead={tp: Curve([float(t) for t in BATCH], [overhead(tp, t) for t in BATCH]) for tp in tp_sizes},
        attention_decode=Grid([float(b) for b in BATCH], [float(c) for c in context],
                              [[decode(b, c) for c in context] for b in BATCH]),
        attention_prefill=Curve([float(p) for p in PAIRS], [prefill(p) for p in PAIRS]),
        # An e4m3 cache: decode streams one byte per element; prefill is compute-bound either way.
        attention_decode_fp8=Grid([float(b) for b in BATCH], [float(c) for c in context],
                                  [[decode(b, c, FP8.itemsize) for c in context] for b in BATCH]),
        attention_prefill_fp8=Curve([float(p) for p in PAIRS], [prefill(p) for p in PAIRS]),
        network=Curve([float(b) for b in MESSAGE_BYTES],
                      [link.message_time(b) for b in MESSAGE_BYTES]),
        meta={"efficiencies": {"gemm": GEMM_EFFICIENCY, "attention_flops": ATTENTION_FLOP_EFFICIENCY,
                               "hbm": HBM_EFFICIENCY},
              "kernel_launch_s": KERNEL_LAUNCH_S, "step_cpu_s": STEP_CPU_S,
              "step_cpu_per_row_s": STEP_CPU_PER_ROW_S,
              "interconnect": link.to_dict()},
    )
