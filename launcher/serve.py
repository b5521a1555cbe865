"""torchrun entry for OpenAI-compatible serving:

    torchrun --nproc-per-node N launcher/serve.py --config CFG

N must equal parallel.tensor_parallel + parallel.attention_workers; `lamina serve` counts the
ranks itself and checks the config before starting any. The program is
megatron_lamina/launch/serve.py (`--help` lists its options).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without pip install

from megatron_lamina.launch.serve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
