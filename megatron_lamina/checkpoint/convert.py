"""One conversion: open a source checkpoint with its reader and write the canonical one.

The body of `tools/convert_checkpoint.py`, callable from Python (tests, scripts). The reader
validates the source's architecture and tensor headers when opened (`validate`), before the
writer creates anything; the writer checks the values as they stream. `quantize_checkpoint`
copies a canonical checkpoint with FP8 weights (benchmarks and tests that already hold one).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors import safe_open

from megatron_lamina.architecture import ModelArchitecture, read_checkpoint_config
from megatron_lamina.checkpoint.errors import CheckpointInputError
from megatron_lamina.checkpoint.readers import open_reader
from megatron_lamina.checkpoint.writer import DTYPES, MODEL_FILE, check_output_dir, write_canonical_checkpoint
from megatron_lamina.fp8 import FP8_NAME


def convert_checkpoint(
    source: str,
    input_path: str | Path,
    output_dir: str | Path,
    dtype: str = "auto",
    overwrite: bool = False,
    *,
    name: str | None = None,
    tokenizer: str | Path | None = None,
    model_config: str | Path | None = None,
    check_all_weights: bool = False,
    weight_dtype: str = "auto",
) -> Path:
    """Convert `input_path` (a `source` checkpoint) into the canonical directory `output_dir`.

    `dtype` is "float32", "bfloat16", "float16" or "auto" (the reader's default_dtype).
    `name` is stored as config.json's source.name. `tokenizer` and `model_config` go to the
    readers that take them (Megatron, DeepSpeed). Every weight is checked finite with
    `check_all_weights`, a sample of each tensor's values otherwise. `weight_dtype` fp8_e4m3
    stores the layers' linear weights as e4m3 with per-output-channel scales (writer.py).
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    inputs = (input_path, tokenizer, model_config)
    check_output_dir(output_dir, overwrite, inputs)
    reader = open_reader(source, input_path, tokenizer=tokenizer, model_config=model_config)
    dtype = reader.default_dtype if dtype == "auto" else dtype
    provenance = reader.provenance()
    if name is not None:
        provenance["name"] = name
    return write_canonical_checkpoint(
        output_dir,
        reader.architecture,
        reader.tensors(),
        dtype=dtype,
        save_tokenizer=reader.save_tokenizer,
        source=provenance,
        overwrite=overwrite,
        check_all_weights=check_all_weights,
        inputs=inputs,
        weight_dtype=weight_dtype,
    )


def quantize_checkpoint(canonical_dir: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    """A copy of canonical checkpoint `canonical_dir` with FP8 weights (as `weight_dtype`
    fp8_e4m3 converts them); the other tensors and the tokenizer as stored."""
    canonical_dir = Path(canonical_dir)
    config = read_checkpoint_config(canonical_dir)
    if config.get("weight_dtype", "auto") != "auto":
        raise CheckpointInputError(canonical_dir, f"holds {config['weight_dtype']} weights already")

    def tensors():
        with safe_open(canonical_dir / MODEL_FILE, "pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)

    return write_canonical_checkpoint(
        output_dir, ModelArchitecture.from_dict(config["architecture"]), tensors(), dtype=config["dtype"],
        save_tokenizer=lambda d: shutil.copytree(canonical_dir / config["tokenizer"], d),
        source={**config["source"], "quantized_from": str(canonical_dir)}, overwrite=overwrite,
        inputs=(canonical_dir,), weight_dtype=FP8_NAME)
