"""Prometheus metrics of the server (`GET /metrics`), fed by the engine thread.

A private `CollectorRegistry` (no process-global state): requests running and waiting, KV
blocks used per attention shard, prompt and generated tokens, and histograms of
time-to-first-token and inter-token latency. `ServerMetrics` is the `EngineListener` the
launcher gives to the `AsyncEngine`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from megatron_lamina.engine.llm_engine import LLMEngine
from megatron_lamina.engine.output import RequestOutput
from megatron_lamina.engine.request import Request

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


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
        self._last_token_time: dict[int, float] = {}

    def on_output(self, request: Request, output: RequestOutput, now: float) -> None:
        new = len(output.token_ids)
        if new:
            self.generation_tokens.inc(new)
            last = self._last_token_time.get(request.request_id)
            if last is None:
                self.prompt_tokens.inc(output.prompt_tokens)
                self.ttft.observe(now - request.arrival_time)
            else:
                self.itl.observe((now - last) / new)
            self._last_token_time[request.request_id] = now
        if output.finished:
            self._last_token_time.pop(request.request_id, None)

    def on_step(self, engine: LLMEngine) -> None:
        scheduler = engine.scheduler
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        blocks = scheduler.blocks
        self.kv_blocks_total.set(blocks.num_blocks)
        for shard in range(len(blocks.free)):
            self.kv_blocks_used.labels(shard=str(shard)).set(blocks.num_blocks - blocks.num_free(shard))

    def render(self) -> bytes:
        return generate_latest(self.registry)
