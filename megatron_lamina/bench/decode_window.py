"""The decode phase of a closed batch, as the server lived it: steps, batch, GPU busy.

A closed batch (tools/bench_serving.py --closed) has a prefill phase (prompts admitted under
the prefill budget, mixed with the first decode rows) and then a decode phase: from the
moment the last request got its first token to the last token. `decode_window` reads that
window from the client's token times, and, from the server's /metrics sampled meanwhile
(bench/server_job.MetricsPoller) and the GPU's utilization (GpuPoller), what the server did
in it: the number of engine steps and so its mean step time, the mean batch (requests
sampled per step), the engine's own GPU-busy share (CUDA events) and NVML's. The mean
context of the rows in the window (prompt + tokens so far, averaged over every row of every
step) is what a component benchmark of the same step needs.
"""

from __future__ import annotations


def _at(samples: list[tuple[float, dict]], t: float, after: bool) -> tuple[float, dict] | None:
    """The first sample at or after `t` (after=True), or the last one at or before it."""
    chosen = [s for s in samples if (s[0] >= t if after else s[0] <= t)]
    if not chosen:
        return None
    return chosen[0] if after else chosen[-1]


def decode_window(report: dict, metrics: list[tuple[float, dict]], gpu: list[tuple[float, float]]) -> dict:
    """`report`: bench_serving's JSON (with `t0_monotonic`); `metrics`, `gpu`: poller samples
    on the time.monotonic() clock."""
    done = [r for r in report["requests"] if r["ok"] and r["token_times_s"]]
    if not done:
        return {}
    t0 = report["t0_monotonic"]
    start = t0 + max(r["token_times_s"][0] for r in done)
    end = t0 + max(r["token_times_s"][-1] for r in done)
    contexts = [r["input_len"] + k for r in done for k, t in enumerate(r["token_times_s"])
                if start < t0 + t <= end]
    out = {"start_s": start - t0, "end_s": end - t0, "duration_s": end - start, "tokens": len(contexts),
           "mean_context": sum(contexts) / len(contexts) if contexts else None}
    first, last = _at(metrics, start, after=True), _at(metrics, end, after=False)
    if first and last and last[0] > first[0]:
        (ta, a), (tb, b) = first, last
        steps = b["lamina_step_seconds_count"] - a["lamina_step_seconds_count"]
        if steps > 0:
            out.update(
                metrics_span_s=tb - ta, steps=steps, mean_step_s=(tb - ta) / steps,
                mean_batch=(b["lamina_step_batch_size_sum"] - a["lamina_step_batch_size_sum"]) / steps,
                mean_step_gpu_s=((b.get("lamina_step_gpu_seconds_sum", 0) - a.get("lamina_step_gpu_seconds_sum", 0))
                                 / steps),
                tokens_per_s=(b["lamina_generation_tokens_total"] - a["lamina_generation_tokens_total"]) / (tb - ta))
        period = b.get("lamina_gpu_period_seconds_total", 0) - a.get("lamina_gpu_period_seconds_total", 0)
        if period > 0:
            out["gpu_busy_events"] = (b["lamina_gpu_busy_seconds_total"] - a["lamina_gpu_busy_seconds_total"]) / period
    util = [u for t, u in gpu if start <= t <= end]
    out["gpu_util_nvml"] = sum(util) / len(util) if util else None
    return out
