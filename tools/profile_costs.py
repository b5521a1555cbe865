"""Measure the cost table of one device type for the planner: the command line of
megatron_lamina/bench/cost_profile.py, whose docstring (`--help`) says what is measured and how.

    python tools/profile_costs.py --model llama3-8b --device cuda --tp 1,2 --device-name H100 --out costs.json
    python tools/profile_costs.py --out out/costs-cpu-tiny.json      # on CPU, the tests' tiny shape
"""

import sys

from megatron_lamina.bench.cost_profile import main

if __name__ == "__main__":
    sys.exit(main())
