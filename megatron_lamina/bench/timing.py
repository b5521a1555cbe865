"""Timing for the benchmark and profiling tools, and the device ceilings they report against.

Three clocks, for three kinds of measurement:
  * `time_ms`: CUDA events around each call, the median (a GPU step, its host launch cost
    included as far as it delays the GPU);
  * `graph_ms`: one call's share of a CUDA graph replaying `calls` calls (a kernel without
    the Python launch cost, as the engine's graphs run it);
  * `wall_s`: the host clock around each call, the device synchronized before and after (the
    profiler's points, on a CPU or a GPU alike).
`copy_bandwidth` and `gemm_rate` are the measured ceilings a step is compared with (the
bytes of a large device-to-device copy, a large bf16 GEMM's FLOP rate).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch


def median(values: Sequence[float]) -> float:
    """The upper median (the middle of an odd count), as every benchmark here reports it."""
    return sorted(values)[len(values) // 2]


def time_ms(fn: Callable, repeat: int = 10, warmup: int = 3, inputs: Sequence[tuple] = ((),)) -> float:
    """Median ms of `fn(*inputs[i % len(inputs)])` over `repeat` calls, each between two CUDA
    events, after `warmup` untimed calls."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return median(times)


def graph_ms(fn: Callable, inputs: Sequence[tuple], calls: int = 10, repeat: int = 7) -> float:
    """Median ms of one call, replayed from a CUDA graph of `calls` calls cycling over `inputs`."""
    for args in inputs:
        fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*inputs[i % len(inputs)])
    graph.replay()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_s(fn: Callable, device: torch.device, warmup: int, repeats: int, setup: Callable | None = None) -> float:
    """Median seconds of `fn(setup())` (or `fn(None)`) on the host clock over `repeats` runs,
    after `warmup` untimed ones; `setup` runs outside the timed region."""
    times = []
    for i in range(warmup + repeats):
        arg = setup() if setup else None
        _sync(device)
        start = time.perf_counter()
        fn(arg)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (bf16)."""
    src = torch.randn(1024**3, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (time_ms(lambda: dst.copy_(src)) / 1e3)


def gemm_rate() -> float:
    """FLOP/s of an 8192^3 bf16 matrix product."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn_like(a)
    return 2 * 8192**3 / (time_ms(lambda: a @ b) / 1e3)


def ceilings() -> tuple[float, float]:
    """(copy bandwidth in bytes/s, bf16 GEMM rate in FLOP/s) of this GPU."""
    return copy_bandwidth(), gemm_rate()


def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel by its name, for the profiles' tables."""
    lowered = name.lower()
    if any(k in lowered for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas")):
        return "GEMM"
    if "decode_kernel" in lowered or "merge_kernel" in lowered:
        return "attention"
    if "quantize_rows" in lowered:
        return "FP8 activation quantization"
    if "nccl" in lowered:
        return "communication"
    return "other (norms, activations, RoPE, copies, sampling inputs)"


def kernel_ms(step) -> tuple[dict[str, float], dict[str, float]]:
    """GPU time of the kernels one call of `step` runs, by kind and by kernel name; kind
    "span" is first kernel start to last kernel end, "count" the number of kernels."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    names: dict[str, float] = {}
    ranges = []
    for event in prof.events():  # the GPU-side activities: kernels and copies
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        ms = event.time_range.elapsed_us() / 1e3
        kinds[kernel_kind(event.name)] = kinds.get(kernel_kind(event.name), 0.0) + ms
        names[event.name] = names.get(event.name, 0.0) + ms
        ranges.append((event.time_range.start, event.time_range.end))
    if ranges:
        kinds["span"] = (max(end for _, end in ranges) - min(start for start, _ in ranges)) / 1e3
        kinds["count"] = len(ranges)
    return kinds, names
