"""The planner's device validation: simulator prediction vs the real server, colocated, one
device; the command line of megatron_lamina/bench/planner_validation.py (`--help` says the steps).

    python tools/validate_planner.py --device cuda --out-dir out/validate     # on a GPU machine
    python tools/validate_planner.py --device cpu --shape tiny --slice azure configs/planner/traces/azure-conv-slice.csv 6 8
"""

import sys

from megatron_lamina.bench.planner_validation import main

if __name__ == "__main__":
    sys.exit(main())
