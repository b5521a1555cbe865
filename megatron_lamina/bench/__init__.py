"""Shared machinery of the benchmark and profiling tools (tools/bench_*.py, tools/profile_costs.py,
tools/validate_planner.py), so that each tool is a thin command line over it:

  cost_profile.py    the planner's cost table measured on a device (tools/profile_costs.py)
  planner_validation.py  the simulator against the real server (tools/validate_planner.py)
  attention_kernel.py    our paged decode kernel against SDPA (tools/bench_attention.py)
  decode_benchmark.py    the model-worker and colocated decode steps (tools/bench_decode.py)
  two_gpu.py         disaggregated across two GPUs against colocated (tools/bench_two_gpu.py)
  timing.py          CUDA-event, CUDA-graph and host-clock timing; copy and GEMM ceilings
  ranks.py           the rank spawner (benchmarks, profiler, tests); a one-rank or torchrun TP world
  plans.py           step plans built by hand (decode steps, paged chunks)
  decode_step.py     our decode step on random weights and caches, and its roofline
  stand_ins.py       parts that stand in for the engine's (attention that returns zeros)
  serving_replay.py  the serving benchmark: a trace or closed batch against an endpoint
  serving_benchmark.py  one GPU machine's whole serving benchmark (tools/serving_benchmark.py)
  server_job.py      a real server started, sampled and stopped (benchmarks and tests)
  decode_window.py   the decode phase of a closed batch, from the client's and server's view
Model shapes are the planner's presets (planner/shapes.py): one description of each model.
"""
