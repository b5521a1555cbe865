"""One conversion: open a source checkpoint with its reader and write the canonical one.

The body of `tools/convert_checkpoint.py`, callable from Python (tests, scripts).
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
) -> Path:
    """Convert `input_path` (a `source` checkpoint) into the canonical directory `output_dir`.

    `dtype` is "float32", "bfloat16", "float16" or "auto" (the reader's default_dtype).
    `name` is stored as config.json's source.name. `tokenizer` and `model_config` go to the
    readers that take them (Megatron, DeepSpeed).
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    check_output_dir(output_dir, overwrite)
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
    )
