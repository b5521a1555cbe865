"""torchrun entry for offline batch generation (JSONL in, JSONL out):

    torchrun --nproc-per-node N launcher/generate.py --config CFG --input IN.jsonl --output OUT.jsonl

N must equal parallel.tensor_parallel + parallel.attention_workers; `lamina generate` counts the
ranks itself and checks the config before starting any. The program is
megatron_lamina/launch/generate.py (`--help` lists its options).
"""

import sys

from megatron_lamina.launch.generate import main

if __name__ == "__main__":
    sys.exit(main())
