"""Build the offline FlashInfer bundle (.whl-fi/) that tools/gpu_flashinfer.sh installs on a
device machine (CPython 3.12, no network): `pip download` the pinned flashinfer-python wheel
and the dependency wheels its import and its paged-decode JIT need (apache-tvm-ffi, pynvml,
requests, tqdm, packaging; not cuda-python, cutlass-dsl, cudnn-frontend or nccl4py, which only
other backends import), copy those wheels to the output folder, and cut the 62 MB
flashinfer wheel down to flashinfer_python-<version>-trimmed-decode.tar.gz (13 MB): every
Python file but two CuTe-DSL experiments, the headers under data/include, CCCL's libcudacxx
(the JIT puts its copy ahead of the toolkit's), the batch/single decode sources and the
top-level csrc headers; no cutlass, spdlog, cub or thrust (empty folders stay, the JIT passes
them as include paths), no other kernels' sources. The tarball is byte-reproducible.

    python tools/pack_flashinfer.py [--out .whl-fi]
"""

from __future__ import annotations

import argparse
import calendar
import csv
import gzip
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

FLASHINFER_VERSION = "0.7.2.post1"
# Pinned wheels -> how to select them: "manylinux" takes the cp312 manylinux wheel, "pure" the
# py3-none-any one (charset-normalizer also has a compiled cp312 wheel, which pip would prefer).
PINS = {
    f"flashinfer-python=={FLASHINFER_VERSION}": "manylinux",
    "apache-tvm-ffi==0.1.15.post2": "manylinux",
    "packaging==26.4": "pure",
    "nvidia-ml-py==13.615.71": "pure",
    "requests==2.34.2": "pure",
    "urllib3==2.8.0": "pure",
    "idna==3.20": "pure",
    "certifi==2026.10.19.post1": "pure",
    "charset-normalizer==3.5.3": "pure",
    "tqdm==4.70.1": "pure",
}
SELECT_ARGS = {
    "manylinux": ["--implementation", "cp"] + [
        arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                        "manylinux_2_17_x86_64", "manylinux2014_x86_64") for arg in ("--platform", tag)],
    "pure": ["--implementation", "py", "--platform", "any"],
}

DIST_INFO = f"flashinfer_python-{FLASHINFER_VERSION}.dist-info"
TOP_LEVEL_DIRS = ("flashinfer/", "b12x/", DIST_INFO + "/")  # drops the top-level build_*.py
DROPPED_PACKAGES = ("flashinfer/experimental/b12x/", "flashinfer/experimental/cake_vsa_sm90_cute/")
KERNEL_SUFFIXES = {".cu", ".cuh", ".c", ".h", ".cpp", ".cc", ".hpp", ".inl"}
DATA = "flashinfer/data/"
KEPT_DATA_TREES = (DATA + "include/", DATA + "cccl/libcudacxx/include/")
KEPT_CSRC = {
    "batch_decode.cu", "batch_decode_jit_binding.cu",
    "batch_decode_customize_config.jinja", "batch_decode_kernel_inst.jinja",
    "single_decode.cu", "single_decode_jit_binding.cu",
    "single_decode_customize_config.jinja", "single_decode_kernel_inst.jinja",
}
# The JIT passes these with -I/-isystem, so they stay as empty directories.
PLACEHOLDER_DIRS = [DATA + d for d in (
    "cutlass/include", "cutlass/tools/util/include", "spdlog/include", "cccl/cub", "cccl/thrust")]


def pip_download(pin: str, selection: str, dest: Path) -> Path:
    """Download one wheel for CPython 3.12 into dest (which must be empty) and return its path."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", *SELECT_ARGS[selection],
                    "-d", str(dest), pin], check=True)
    (wheel,) = dest.glob("*.whl")
    return wheel


def is_kept(name: str) -> bool:
    """The keep/drop rules (module docstring) for one file of the flashinfer wheel."""
    if not name.startswith(TOP_LEVEL_DIRS) or name.startswith(DROPPED_PACKAGES):
        return False
    if not name.startswith(DATA):
        return PurePosixPath(name).suffix not in KERNEL_SUFFIXES
    rest = name[len(DATA):]
    if "/" not in rest:  # data/build_backend.py, data/build_utils.py
        return True
    if rest.startswith("csrc/"):
        csrc_name = rest[len("csrc/"):]
        return csrc_name in KEPT_CSRC or ("/" not in csrc_name and csrc_name.endswith((".h", ".cuh")))
    return name.startswith(KEPT_DATA_TREES)


def parent_dirs(path: str) -> list[str]:
    parts = path.rstrip("/").split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def trimmed_record(wheel: zipfile.ZipFile, kept: set[str]) -> bytes:
    """The wheel's RECORD restricted to the kept files; RECORD itself stays the last row."""
    rows = csv.reader(io.TextIOWrapper(wheel.open(f"{DIST_INFO}/RECORD"), encoding="utf-8"))
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(row for row in rows if row[0] in kept)
    return out.getvalue().encode()


def zip_mtime(member: zipfile.ZipInfo) -> int:
    """A zip entry's timestamp, read as UTC so that the tarball does not depend on the local zone."""
    return calendar.timegm(member.date_time + (0, 0, 0))


def tar_entry(name: str, size: int, mtime: int, is_dir: bool) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = (tarfile.DIRTYPE, 0o755) if is_dir else (tarfile.REGTYPE, 0o644)
    info.size, info.mtime, info.uname, info.gname = size, mtime, "root", "root"
    return info


def build_trimmed_tarball(wheel_path: Path, tarball: Path) -> int:
    """Write the trimmed package as a tar.gz; return the number of files kept."""
    with zipfile.ZipFile(wheel_path) as wheel:
        members = {m.filename: m for m in wheel.infolist() if not m.is_dir() and is_kept(m.filename)}
        record = trimmed_record(wheel, set(members))
        stamp = max(zip_mtime(m) for m in members.values())  # for directories and RECORD
        dirs = {d for name in [*members, *PLACEHOLDER_DIRS] for d in parent_dirs(name)}
        dirs.update(PLACEHOLDER_DIRS)
        with open(tarball, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted([*dirs, *members]):
                if name in dirs:
                    tar.addfile(tar_entry(name, 0, stamp, is_dir=True))
                elif name == f"{DIST_INFO}/RECORD":
                    tar.addfile(tar_entry(name, len(record), stamp, is_dir=False), io.BytesIO(record))
                else:
                    member = members[name]
                    entry = tar_entry(name, member.file_size, zip_mtime(member), is_dir=False)
                    with wheel.open(member) as data:
                        tar.addfile(entry, data)
    return len(members)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".whl-fi"), help="output folder")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (pin, selection) in enumerate(PINS.items()):
            wheel = pip_download(pin, selection, Path(tmp, str(i)))
            if pin.startswith("flashinfer-python=="):
                tarball = out / f"flashinfer_python-{FLASHINFER_VERSION}-trimmed-decode.tar.gz"
                print(f"{tarball.name}: {build_trimmed_tarball(wheel, tarball)} files kept")
                written.append(tarball)
            else:
                written.append(Path(shutil.copy2(wheel, out)))
    for path in written:
        print(f"{path.stat().st_size / 1e6:8.2f} MB  {path.name}")
    print(f"{sum(p.stat().st_size for p in written) / 1e6:8.2f} MB  total in {out}")


if __name__ == "__main__":
    main()
