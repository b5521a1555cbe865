"""Shared machinery of the benchmark and profiling tools (tools/bench_*.py, tools/profile.py)."""
