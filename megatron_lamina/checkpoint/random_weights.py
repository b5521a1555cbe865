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

`write_random_spec` writes the same checkpoint but for its tensors: config.json (its source
says `generated_at_load`), the tokenizer and an empty model.safetensors. The worker factory
then draws each model worker's parameters on its device at load (`fill_random`: matrices
N(0, STD) from a generator seeded per parameter name and TP rank, 1-D weights 1; FP8 linears
quantized by the converter's rule), so a shape whose weights do not fit the disk (LLaMA-3-70B:
140 GB in bf16, on a 64 GiB disk) is served with no weights written. The values differ from
`write_random_checkpoint`'s (drawn per shard, not sharded from a whole): both are noise.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from megatron_lamina.architecture import FORMAT, ModelArchitecture, read_checkpoint_config
from megatron_lamina.checkpoint.layout import canonical_tensor_shapes
from megatron_lamina.checkpoint.word_tokenizer import BOS_ID, EOS_ID, word_level_tokenizer
from megatron_lamina.checkpoint.writer import (
    DTYPES, MODEL_FILE, TOKENIZER_DIR, check_output_dir, write_canonical_checkpoint,
)
from megatron_lamina.fp8 import FP8, quantize_weight
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
    arch = random_architecture(shape_name)
    shapes = canonical_tensor_shapes(arch)
    tensors = random_tensors(shapes, DTYPES[dtype], device, seed, threads or torch.get_num_threads(),
                             block_elements)
    return write_canonical_checkpoint(
        output, arch, tensors, dtype=dtype,
        save_tokenizer=lambda d: word_level_tokenizer(shape.vocab_size).save_pretrained(str(d)),
        source={"path": f"random:{shape.name}", "random": {"shape": shape.name, "seed": seed, "std": STD}},
        overwrite=overwrite)


def random_architecture(shape_name: str) -> ModelArchitecture:
    """The architecture of a shape preset, with the word-level tokenizer's BOS and EOS."""
    shape = load_shape(shape_name)
    arch = shape.to_architecture()
    arch.bos_token_id, arch.eos_token_ids = BOS_ID, [EOS_ID]
    if shape.name.startswith("llama3"):
        arch.rope_theta = 500000.0
    return arch


def write_random_spec(output: str | Path, shape_name: str, dtype: str = "bfloat16", seed: int = 0,
                      overwrite: bool = False) -> Path:
    """A checkpoint of `shape_name` whose tensors are drawn at load (module docstring): a few
    files, whatever the shape's size."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    output = Path(output).absolute()
    check_output_dir(output, overwrite)
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    arch = random_architecture(shape_name)
    word_level_tokenizer(arch.vocab_size).save_pretrained(str(output / TOKENIZER_DIR))
    # An empty safetensors file (a header of no tensors): what reads the header still can.
    (output / MODEL_FILE).write_bytes(struct.pack("<Q", 8) + b"{}      ")
    source = {"path": f"random:{shape_name}", "random": {"shape": shape_name, "seed": seed, "std": STD},
              "generated_at_load": True}
    config = {"format": FORMAT, "architecture": arch.to_dict(), "dtype": dtype, "tokenizer": TOKENIZER_DIR,
              "source": source}
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return output


def generated_at_load(checkpoint_dir: str | Path) -> dict | None:
    """The seed and std of a checkpoint whose tensors are drawn at load, else None."""
    source = read_checkpoint_config(checkpoint_dir).get("source", {})
    return source["random"] if source.get("generated_at_load") else None


@torch.no_grad()
def fill_random(model: torch.nn.Module, seed: int, std: float = STD, tp_rank: int = 0) -> None:
    """Every parameter of `model` (one TP rank's shard) drawn where it is: matrices N(0, std)
    from a generator per parameter and rank, 1-D weights 1; an e4m3 weight drawn in its
    model's dtype and quantized as the converter quantizes (its scale set with it)."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.endswith(".weight_scale"):
            continue  # set with its weight
        if p.dim() == 1:
            p.fill_(1.0)
            continue
        # Seeded by name, so that a model with FP8 linears (their scales are parameters too)
        # draws the values the unquantized one does, then rounds them.
        key = zlib.crc32(name.encode())
        generator = torch.Generator(p.device).manual_seed(((seed * 1_000_003 + key) * 1_000_003) + tp_rank)
        dtype = model.config.params_dtype if p.dtype == FP8 else p.dtype
        values = torch.empty(p.shape, dtype=dtype, device=p.device).normal_(0.0, std, generator=generator)
        if p.dtype == FP8:
            values, scales = quantize_weight(values)
            params[name + "_scale"].copy_(scales)
        p.copy_(values)
