"""A canonical checkpoint of a model-shape preset with random weights (the program of
tools/random_checkpoint.py; tools/validate_planner.py writes one in-process).

For benchmarks and the planner's device validation, where only the shape matters: the shape
comes from megatron_lamina/planner/shapes.py (`PRESETS`), every matrix is N(0, 0.02) from a
generator seeded per tensor (and per row block on the CPU, so the values do not depend on the
thread count), every norm weight is 1. Tensors are made one at a time and streamed through
the canonical writer (writer.py), so peak memory is about one tensor. On a GPU (`device`
cuda) they are drawn there (an 8B model's 16 GB in seconds); on the CPU the row blocks of a
tensor are drawn by a thread pool. The tokenizer is a word-level one of the model's whole
vocabulary (word_tokenizer.py; BOS 1, EOS 2), so any token id the model can emit decodes to
a word.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from megatron_lamina.checkpoint.layout import canonical_tensor_shapes
from megatron_lamina.checkpoint.word_tokenizer import BOS_ID, EOS_ID, word_level_tokenizer
from megatron_lamina.checkpoint.writer import DTYPES, write_canonical_checkpoint
from megatron_lamina.planner.shapes import load_shape

STD = 0.02
ROWS_PER_BLOCK_ELEMENTS = 1 << 22  # CPU: one generator per block of rows of about this many elements


def random_tensors(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: str, seed: int, threads: int,
                   block_elements: int = ROWS_PER_BLOCK_ELEMENTS):
    """(name, tensor) for every canonical tensor, made when asked for; on the CPU each matrix
    is drawn in blocks of rows of about `block_elements` values, one generator each."""
    pool = ThreadPoolExecutor(threads) if device == "cpu" and threads > 1 else None
    try:
        for index, (name, shape) in enumerate(shapes.items()):
            if len(shape) == 1:  # norm weights (biases would be 1 too: none in the presets)
                yield name, torch.ones(shape, dtype=dtype)
                continue
            out = torch.empty(shape, dtype=dtype, device=device)
            base = (seed * 1_000_003 + index) * 1_000_003
            if device != "cpu":
                out.normal_(0.0, STD, generator=torch.Generator(device).manual_seed(base))
            else:
                rows = max(1, block_elements // shape[1])
                blocks = [(base + i, out[start:start + rows]) for i, start in enumerate(range(0, shape[0], rows))]

                def fill(block):
                    block[1].normal_(0.0, STD, generator=torch.Generator().manual_seed(block[0]))

                list(pool.map(fill, blocks)) if pool else [fill(b) for b in blocks]
            yield name, out
    finally:
        if pool:
            pool.shutdown()


def write_random_checkpoint(output: str | Path, shape_name: str, dtype: str = "bfloat16", device: str = "cpu",
                            seed: int = 0, threads: int | None = None, overwrite: bool = False,
                            block_elements: int = ROWS_PER_BLOCK_ELEMENTS) -> Path:
    shape = load_shape(shape_name)
    arch = shape.to_architecture()
    arch.bos_token_id, arch.eos_token_ids = BOS_ID, [EOS_ID]
    if shape.name.startswith("llama3"):
        arch.rope_theta = 500000.0
    shapes = canonical_tensor_shapes(arch)
    tensors = random_tensors(shapes, DTYPES[dtype], device, seed, threads or torch.get_num_threads(),
                             block_elements)
    return write_canonical_checkpoint(
        output, arch, tensors, dtype=dtype,
        save_tokenizer=lambda d: word_level_tokenizer(shape.vocab_size).save_pretrained(str(d)),
        source={"path": f"random:{shape.name}", "random": {"shape": shape.name, "seed": seed, "std": STD}},
        overwrite=overwrite)
