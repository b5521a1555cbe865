"""One conversion: open a source checkpoint with its reader and write the canonical one.

The body of `tools/convert_checkpoint.py`, callable from Python (tests, scripts). The reader
validates the source's architecture and tensor headers when opened (`validate`), before the
writer creates anything; the writer checks the values as they stream.
"""

from __future__ import annotations

from pathlib import Path

from megatron_lamina.checkpoint.readers import open_reader
from megatron_lamina.checkpoint.writer import DTYPES, check_output_dir, write_canonical_checkpoint


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
