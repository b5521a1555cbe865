"""What `model.checkpoint` names, made into a canonical checkpoint directory the ranks can load.

The launchers (`lamina serve|generate` before any rank starts, then every rank and the HTTP
front end at start-up) call `canonical_checkpoint` on the config's value, as vLLM serves a
Hugging Face directory: a canonical directory is used as it is; a Hugging Face model
directory or a GGUF file is converted (`checkpoint/convert.py`, the `lamina convert` code)
into a cache directory, `$LAMINA_CACHE_DIR` or `~/.cache/megatron-lamina`, under a name that
holds a hash of the source's path, sizes and modification times, so an edited source is
converted again and an unchanged one never is. The conversion runs once: an exclusive lock
(`flock`) beside the cache entry makes every other process (ranks, a second launcher) wait
for it and then reuse the result, and it is written beside its final name and renamed, so a
killed conversion leaves nothing that looks finished. Anything else (a Megatron or DeepSpeed
save, a directory that is no checkpoint) is a `CheckpointInputError` naming what the path is
and the command to run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from megatron_lamina.architecture import FORMAT
from megatron_lamina.checkpoint.errors import CheckpointInputError

AUTO_SOURCES = {"hf": "a Hugging Face model directory", "gguf": "a GGUF file"}


def cache_root(environ=os.environ) -> Path:
    """Where converted checkpoints are kept: $LAMINA_CACHE_DIR, else ~/.cache/megatron-lamina."""
    given = environ.get("LAMINA_CACHE_DIR")
    if given:
        return Path(given).expanduser()
    base = environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "megatron-lamina"


def locate(given: str, config_file: str | Path | None = None) -> Path:
    """The path `model.checkpoint` names. A relative one is looked for beside the config file
    first, then in the working directory; CheckpointInputError names both when it is in neither."""
    path = Path(given).expanduser()
    if path.is_absolute():
        if not path.exists():
            raise CheckpointInputError(path, "no such file or directory")
        return path
    places = ([("the config file's directory", Path(config_file).resolve().parent)] if config_file else [])
    places.append(("the working directory", Path.cwd()))
    for _, base in places:
        if (base / path).exists():
            return base / path
    looked = " nor ".join(f"{base / path} (relative to {what})" for what, base in places)
    raise CheckpointInputError(Path(given), f"no such file or directory: not {looked}")


def source_kind(path: Path) -> str | None:
    """'canonical', 'hf', 'gguf', or what `lamina convert` would call it ('megatron', 'deepspeed'),
    or None for something that is no checkpoint."""
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and "format" in data:
            return "canonical" if data["format"] == FORMAT else None
        if isinstance(data, dict) and ("model_type" in data or "architectures" in data):
            return "hf"
    from megatron_lamina.checkpoint.readers import guess_source

    return guess_source(path)


def canonical_checkpoint(given: str, config_file: str | Path | None = None,
                         log: Callable[[str], None] = lambda line: None, environ=os.environ) -> str:
    """The canonical checkpoint directory for the value of `model.checkpoint` (converted and
    cached if it names a Hugging Face directory or a GGUF file). `log` gets a line when a
    conversion starts and ends (the launcher prints them)."""
    path = locate(given, config_file)
    kind = source_kind(path)
    if kind == "canonical":
        return str(path)
    if kind not in AUTO_SOURCES:
        raise CheckpointInputError(path, _what_to_run(path, kind))
    target = cache_root(environ) / _cache_name(path)
    if source_kind(target) == "canonical":  # converted before: no lock needed to read it
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds it converted
        if source_kind(target) != "canonical":
            _convert(kind, path, target, log)
    return str(target)


def _convert(kind: str, path: Path, target: Path, log: Callable[[str], None]) -> None:
    from megatron_lamina.checkpoint.convert import convert_checkpoint

    log(f"converting {path} ({AUTO_SOURCES[kind]}) into {target}, once: later starts reuse it")
    partial = target.with_name(target.name + ".partial")
    for stale in (partial, target):  # a conversion killed before (the lock is ours now)
        shutil.rmtree(stale, ignore_errors=True)
    convert_checkpoint(kind, path, partial, name=path.stem if kind == "gguf" else path.name)
    os.rename(partial, target)
    log(f"converted {path} into {target}")


def _cache_name(path: Path) -> str:
    """`<name>-<hash>`: the hash of the resolved path and of each file's size and mtime."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256(str(path).encode())
    for f in files:
        stat = f.stat()
        digest.update(f"{f.relative_to(path) if f != path else ''}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"{path.stem if path.is_file() else path.name}-{digest.hexdigest()[:16]}"


def _what_to_run(path: Path, kind: str | None) -> str:
    if kind in ("megatron", "deepspeed"):
        return (f"is a {kind} checkpoint, which is not converted at load: convert it once with "
                f"`lamina convert --source {kind} --input {path} --output checkpoints/NAME --tokenizer TOKENIZER` "
                "and set model.checkpoint to checkpoints/NAME")
    what = ("a file that is not a GGUF file" if path.is_file()
            else "a directory with a config.json that is neither a megatron-lamina nor a Hugging Face one"
            if (path / "config.json").is_file() else "a directory without a config.json")
    return (f"is not a checkpoint ({what}); model.checkpoint takes a megatron-lamina checkpoint directory, "
            "a Hugging Face model directory or a GGUF file; other formats: `lamina convert --help`")


def with_canonical_checkpoint(cfg, config_file: str | Path | None = None,
                              log: Callable[[str], None] = lambda line: None):
    """`cfg` (a LaminaConfig) with model.checkpoint made the canonical directory it names."""
    path = canonical_checkpoint(cfg.model.checkpoint, config_file, log)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"checkpoint": path})})
