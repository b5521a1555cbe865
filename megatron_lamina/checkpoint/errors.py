"""The one exception a user's input can cause while converting or loading a checkpoint.

Readers, the writer and the loader raise `CheckpointInputError` for problems with files the
user named (missing, unsupported architecture, output already there...); the message is
`<file>: <reason>`, which `tools/convert_checkpoint.py` prints as one `error:` line. Bugs of
our own stay asserts.
"""

from __future__ import annotations

from pathlib import Path


class CheckpointInputError(ValueError):
    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")
