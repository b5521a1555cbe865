"""Prometheus metrics of the server (`GET /metrics`), kept by the front end, fed once per step.

A private `CollectorRegistry` (no process-global state): requests running and waiting, KV
blocks used per attention shard, prompt and generated tokens, histograms of
time-to-first-token and inter-token latency, the prefix cache's queries, hits (device and
host tier apart), evictions and host copies,
and the engine's steps as a user needs them to
see whether the server is bound by the GPU or by its host: the time of each step, its batch
(requests sampled) and token rows, and the share of the time the GPU was busy with steps
(`lamina_gpu_busy_ratio`: the GPU's span of each step over the GPU time from the previous
step's end to this one's, for steps that ran back to back, over the last
`BUSY_WINDOW` steps; a host-bound server shows a low value). The front end's `EngineClient`
calls `on_step` with each step's deltas and the engine's `StepReport`; latencies are measured
where the client meets them, from a request's admission by the front end to its tokens'
arrival there.
"""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from megatron_lamina.requests.engine_link import StepReport
from megatron_lamina.requests.output import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TOKEN_BUCKETS = (1, 8, 32, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
BUSY_WINDOW = 64


class ServerMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("lamina_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("lamina_requests_waiting", "Requests waiting for admission", registry=r)
        self.kv_blocks_used = Gauge("lamina_kv_blocks_used", "KV blocks in use", ["shard"], registry=r)
        self.kv_blocks_total = Gauge("lamina_kv_blocks_total", "KV blocks per attention shard", registry=r)
        self.prompt_tokens = Counter("lamina_prompt_tokens", "Prompt tokens of requests that started", registry=r)
        self.generation_tokens = Counter("lamina_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("lamina_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lamina_inter_token_latency_seconds", "Time between consecutive tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.step_time = Histogram("lamina_step_seconds", "Engine step: launch to tokens read back (host clock)",
                                   buckets=STEP_BUCKETS, registry=r)
        self.step_gpu_time = Histogram("lamina_step_gpu_seconds", "Engine step: its span on the GPU",
                                       buckets=STEP_BUCKETS, registry=r)
        self.step_batch = Histogram("lamina_step_batch_size", "Requests sampled per step",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.step_tokens = Histogram("lamina_step_tokens", "Token rows computed per step (decode and prefill)",
                                     buckets=TOKEN_BUCKETS, registry=r)
        self.last_batch = Gauge("lamina_step_last_batch_size", "Requests sampled in the last step", registry=r)
        self.gpu_busy = Gauge("lamina_gpu_busy_ratio", f"GPU busy share over the last {BUSY_WINDOW} back-to-back "
                              "steps (step span / time since the previous step ended)", registry=r)
        self.gpu_busy_seconds = Counter("lamina_gpu_busy_seconds", "GPU time spent in back-to-back steps",
                                        registry=r)
        self.gpu_period_seconds = Counter("lamina_gpu_period_seconds", "GPU time between back-to-back step ends",
                                          registry=r)
        # The prefix cache (driver/block_manager.py), in vLLM's units: tokens of the admitted
        # requests looked up, tokens found (by tier: device, host), device blocks whose prefix
        # was evicted, blocks copied to the host tier and back.
        self.prefix_queries = Counter("lamina_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("lamina_prefix_cache_hits", "Prompt tokens served from the prefix cache",
                                   ["tier"], registry=r)
        self.prefix_host_copies = Counter("lamina_prefix_cache_host_copies", "KV blocks copied by the host tier",
                                          ["direction"], registry=r)
        for tier in ("device", "host"):  # exported from the start, at 0
            self.prefix_hits.labels(tier=tier)
        for direction in ("to_host", "to_device"):
            self.prefix_host_copies.labels(direction=direction)
        self.prefix_evictions = Counter("lamina_prefix_cache_evictions", "Cached KV blocks evicted for reuse",
                                        registry=r)
        self._prefix_seen = (0,) * 6
        self._last_token_time: dict[int, float] = {}
        self._window: deque[tuple[float, float]] = deque(maxlen=BUSY_WINDOW)

    def on_step(self, report: StepReport | None, outputs: list[tuple[int, float, RequestOutput]],
                now: float) -> None:
        """`outputs`: (request key, admission time, delta) of the step's requests."""
        generated = 0
        for key, arrival, output in outputs:
            new = len(output.token_ids)
            if new:
                generated += new
                last = self._last_token_time.get(key)
                if last is None:
                    self.prompt_tokens.inc(output.prompt_tokens)
                    self.ttft.observe(now - arrival)
                else:
                    self.itl.observe((now - last) / new)
                self._last_token_time[key] = now
            if output.finished:
                self._last_token_time.pop(key, None)
        if generated:
            self.generation_tokens.inc(generated)
        if report is not None:
            self._engine_report(report)

    def forget(self, key: int) -> None:
        """A request whose caller left before its end: no more latencies of it."""
        self._last_token_time.pop(key, None)

    def _engine_report(self, report: StepReport) -> None:
        for step in report.steps:
            self.step_time.observe(step.wall_s)
            self.step_batch.observe(step.rows)
            self.step_tokens.observe(step.tokens)
            self.last_batch.set(step.rows)
            if step.gpu_s is not None:
                self.step_gpu_time.observe(step.gpu_s)
            if step.gpu_period_s is not None and step.gpu_period_s > 0:
                busy = min(step.gpu_s, step.gpu_period_s)
                self.gpu_busy_seconds.inc(busy)
                self.gpu_period_seconds.inc(step.gpu_period_s)
                self._window.append((busy, step.gpu_period_s))
        if self._window:
            self.gpu_busy.set(sum(b for b, _ in self._window) / sum(p for _, p in self._window))
        queries, hits, host_hits, evictions, offloads, loads = (
            now - seen for now, seen in zip(report.prefix_cache, self._prefix_seen))
        self._prefix_seen = report.prefix_cache
        self.prefix_queries.inc(queries)
        self.prefix_hits.labels(tier="device").inc(hits)
        self.prefix_hits.labels(tier="host").inc(host_hits)
        self.prefix_evictions.inc(evictions)
        self.prefix_host_copies.labels(direction="to_host").inc(offloads)
        self.prefix_host_copies.labels(direction="to_device").inc(loads)
        self.running.set(report.running)
        self.waiting.set(report.waiting)
        self.kv_blocks_total.set(report.blocks_total)
        for shard, used in enumerate(report.blocks_used):
            self.kv_blocks_used.labels(shard=str(shard)).set(used)

    def render(self) -> bytes:
        return generate_latest(self.registry)
