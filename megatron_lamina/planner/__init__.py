"""The planner (DESIGN.md section 8): which layout serves a workload at the lowest cost.

One job per module, data flowing down the list:
  shapes.py      the model's shape (presets or a canonical checkpoint) and what follows from it
  devices.py     device prices and datasheet numbers (configs/planner/prices.yaml)
  cost_table.py  measured or synthetic costs of one device type: model layer, attention,
                 transport, per-step overhead; JSON load/save and interpolation
  synthetic.py   cost tables from a datasheet roofline, for devices nobody has profiled
  trace.py       request traces (Azure CSV, Mooncake JSONL) as arrival time + token counts
  layout.py      one candidate layout: devices, KV capacity, price, the config it becomes
  link.py        the model-attention network: latency + bytes / bandwidth per message
  pipeline.py    the time of one engine step: staggered pipeline or colocated
  simulator.py   discrete-event replay of a trace through the engine's own scheduler
  serving_overhead.py  a real server's per-step host time beyond the profile, fitted from
                 calibration runs (bench/planner_validation.py)
  stats.py       percentiles and the latency summary shared with tools/bench_serving.py
  search.py      enumerate layouts, simulate each, rank by throughput per dollar under a SLO
  deployment.py  the chosen layout on machines: deployment.nodes and each machine's command
  report.py      a search's printed ranking, plot and recommended config file
  command.py     `lamina plan`: search and simulate from the command line

bench/cost_profile.py (tools/profile_costs.py) measures cost tables, `lamina plan` drives the rest; docs/PLANNER.md says how
the simulator models the engine and what it assumes.
"""
