"""The one exception a user's input can cause while converting or loading a checkpoint.

Readers, the writer and the loader raise `CheckpointInputError` for problems with files the
user named (missing, a file where a directory belongs or the reverse, truncated or corrupt,
unsupported architecture, output already there...); the message is `<file>: <reason>`, which
`lamina convert` / `tools/convert_checkpoint.py` prints as one `error:` line. The helpers
below check paths and open safetensors files that way. Bugs of our own stay asserts.
"""

from __future__ import annotations

from pathlib import Path


class CheckpointInputError(ValueError):
    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def expect_directory(path: Path, what: str) -> None:
    """`path` must be a directory: `what` it should be names the expectation in the error."""
    if not path.is_dir():
        kind = "is a file, not a directory" if path.exists() else "no such directory"
        raise CheckpointInputError(path, f"{kind} (expected {what})")


def expect_file(path: Path, what: str) -> None:
    if not path.is_file():
        kind = "is a directory, not a file" if path.is_dir() else "no such file"
        raise CheckpointInputError(path, f"{kind} (expected {what})")


def open_safetensors(path: Path):
    """A safetensors file opened for lazy reads; a truncated or corrupt one is a
    CheckpointInputError naming it (safetensors' own error names no file)."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointInputError(path, f"not a readable safetensors file, truncated or corrupt ({e})") from None
