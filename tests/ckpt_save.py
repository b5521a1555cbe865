"""Saves the training-framework checkpoints of the checkpoint tests, on two gloo ranks.

    python tests/ckpt_save.py OUT_DIR UNTIED_CANONICAL_DIR SENTENCEPIECE_MODEL TIED_HF_DIR

Both ranks first save a Megatron-core model split over them (tests/ckpt_save_megatron.py, into
OUT_DIR/megatron), then DeepSpeed ZeRO checkpoints with them as data-parallel ranks
(tests/ckpt_save_deepspeed.py, into OUT_DIR/deepspeed). One script and one pair of processes
for both: importing torch, Megatron, DeepSpeed and transformers is most of the cost. A
script with a `__main__` guard because dist_checkpointing.save starts processes.
"""

from __future__ import annotations

import sys
from pathlib import Path



def save_on_rank(out_dir: str, untied_canonical: str, sentencepiece_model: str, tied_hf_dir: str) -> None:
    import ckpt_save_deepspeed
    import ckpt_save_megatron

    ckpt_save_megatron.save_on_rank(untied_canonical, str(Path(out_dir) / "megatron"), sentencepiece_model)
    ckpt_save_deepspeed.save_on_rank(tied_hf_dir, str(Path(out_dir) / "deepspeed"))


if __name__ == "__main__":
    from spawn_ranks import run_ranks

    run_ranks(save_on_rank, 2, *sys.argv[1:5])
