#!/usr/bin/env python
"""Convert a checkpoint (Hugging Face, GGUF, Megatron, DeepSpeed) into a canonical megatron-lamina
checkpoint: `lamina convert` as a script (megatron_lamina/launch/convert.py; `--help` shows an
example per source)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without pip install

from megatron_lamina.launch.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
