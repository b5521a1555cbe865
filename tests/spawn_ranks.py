"""Run a function on N real ranks (separate processes, gloo over loopback) for tests: the
benchmarks' spawner (megatron_lamina/bench/ranks.py: `run_ranks`, `free_port`), under the
name the tests import."""

from megatron_lamina.bench.ranks import free_port, run_ranks

__all__ = ["free_port", "run_ranks"]
