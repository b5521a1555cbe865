"""torchrun entry for OpenAI-compatible serving:

    torchrun --nproc-per-node N launcher/serve.py --config CFG

N must equal parallel.tensor_parallel + parallel.attention_workers; `lamina serve` counts the
ranks itself and checks the config before starting any. The program is
megatron_lamina/launch/serve.py (`--help` lists its options).
"""

import sys

from megatron_lamina.launch.serve import main

if __name__ == "__main__":
    sys.exit(main())
