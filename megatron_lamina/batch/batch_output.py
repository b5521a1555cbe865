"""The batch job's output file: one writer at a time, records appended and flushed, resumable.

`BatchOutput.open` creates the file's directory, takes an exclusive `flock` on the file
itself (held until the job's process ends, however it ends) and only then truncates it or,
with `resume`, reads back the records an earlier run wrote: a last line cut short by a kill
is removed (its request runs again) and every complete record's key is kept, so that the
job runs only what is missing. A second job on the same file (a `--resume` beside a stale
run that is still writing) is refused with one line naming the file and the holder's pid,
instead of two writers interleaving records. Nothing a user has is lost by a mistaken
command: an output that is the job's input (the same file by any path, symlink or hard link)
is refused, and so is an output that already holds something, unless `resume` keeps it or
`overwrite` (`--overwrite`) says to replace it; `check_output` is that rule, which the
launcher asks before any rank starts and `open` again once the file is locked. Output records
are `{"id", "text", "token_ids", "finish_reason"}`, or `{"id", "line", "error", "finish_reason": "error"}`.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import IO


class OutputError(RuntimeError):
    """The output file cannot be written by this job (another job holds it, it is not a file of
    records, ...); str() is one line naming it."""


class BatchOutput:
    def __init__(self, path: Path, file: IO[bytes], done: dict):
        self.path, self._file = path, file
        self.done = done  # key (see BatchLine.key) -> whether its record is an error

    @classmethod
    def open(cls, path: str | Path, resume: bool, overwrite: bool = False,
             input_path: str | Path | None = None) -> "BatchOutput":
        path = Path(path)
        _check_flags(resume, overwrite)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            file = open(path, "a+b")  # no truncation before the checks and the lock
        except OSError as e:
            raise OutputError(f"{path}: cannot write it ({e.strerror or e})") from None
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            raise OutputError(_busy(path)) from None
        try:  # the file as opened (its inode), not its name, is what the job will write
            _check_contents(path, os.fstat(file.fileno()), input_path, resume, overwrite)
        except OutputError:
            file.close()
            raise
        done = _read_records(path, file) if resume else {}
        if not resume:
            file.truncate(0)
        return cls(path, file, done)

    def write(self, record: dict) -> None:
        self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def check_output(path: str | Path, input_path: str | Path | None, resume: bool, overwrite: bool) -> None:
    """Raise OutputError now if the job may not write `path` (the launcher asks before it
    starts any rank); changes nothing."""
    _check_flags(resume, overwrite)
    check_output_free(path)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputError(f"{path}: cannot write it ({e.strerror or e})") from None
    _check_contents(Path(path), stat, input_path, resume, overwrite)


def _check_flags(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise OutputError("--resume keeps the records in --output and --overwrite replaces them: choose one")


def _check_contents(path: Path, stat: os.stat_result, input_path: str | Path | None, resume: bool,
                    overwrite: bool) -> None:
    """The output file `path` (`stat` of it) is not the input, and holds nothing that would be lost."""
    if input_path is not None:
        try:
            source = os.stat(input_path)
        except OSError:
            source = None  # no input to lose; the job reports a missing input itself
        if source is not None and (source.st_dev, source.st_ino) == (stat.st_dev, stat.st_ino):
            how = "" if os.path.abspath(path) == os.path.abspath(input_path) else " (through a link or another path)"
            raise OutputError(f"--output {path} is the input file {input_path}{how}: writing it would destroy the "
                              "input; choose another output file")
    if not resume and not overwrite and stat.st_size > 0:
        raise OutputError(f"{path} already holds {stat.st_size} bytes; pass --resume to keep its records and run "
                          "only the lines missing there, or --overwrite to replace it")


def check_output_free(path: str | Path) -> None:
    """Raise OutputError now if another job holds the file (the launcher asks before it starts
    any rank); changes nothing."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, "rb") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(_busy(path)) from None


def _busy(path: Path) -> str:
    holder = lock_holder(path)
    return (f"{path}: another job{f' (pid {holder})' if holder else ''} is writing it; wait for it to end "
            "or stop it, then run again (with --resume to keep its records)")


def lock_holder(path: Path) -> int | None:
    """The pid holding a flock on `path`, from /proc/locks (Linux; matched by inode), or None."""
    try:
        inode = os.stat(path).st_ino
        locks = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for entry in locks:  # "1: FLOCK  ADVISORY  WRITE 4242 00:2f:1234567 0 EOF"
        fields = entry.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            return int(fields[4])
    return None


def _read_records(path: Path, file: IO[bytes]) -> dict:
    file.seek(0)
    data = file.read()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        file.truncate(len(complete))
    done = {}
    for line_no, line in enumerate(complete.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = record["id"] if record["id"] is not None else ("line", record["line"])
            done[key] = record.get("finish_reason") == "error"
        except (ValueError, KeyError, TypeError):
            raise OutputError(f"{path}:{line_no}: not a record of a batch job; --resume needs the output of an "
                             "earlier run of this job (move the file away to start afresh)") from None
    return done
