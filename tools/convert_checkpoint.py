#!/usr/bin/env python
"""Convert a checkpoint (Hugging Face, GGUF, Megatron, DeepSpeed) into a canonical megatron-lamina
checkpoint: `lamina convert` as a script (megatron_lamina/launch/convert.py; `--help` shows an
example per source)."""

import sys

from megatron_lamina.launch.convert import main

if __name__ == "__main__":
    sys.exit(main())
