"""The Triton kernels compiled for Hopper (sm_90) on a machine without a GPU: Triton's own
compiler, down to PTX and its bundled ptxas, run as a GPU run would before its first launch.

The interpreter (`TRITON_INTERPRET=1`, the kernels' numerical tests) runs a kernel as Python
and accepts what a real compile refuses: a plain global read inside a kernel, a type that
does not lower. This compile is what catches those in CI; a device run found the first one.

The tests' own process runs Triton as its interpreter (conftest), so the compiles run in a
child without it: this file, as a script, given every case at once (one import of torch and
Triton for all of them); each case is still a test of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

pytest.importorskip("triton")

HOPPER = ("cuda", 90, 32)  # Triton's GPUTarget: backend, compute capability, warp size
POINTER_TYPES = {"table_ptr": "*i32", "lens_ptr": "*i32", "q_starts_ptr": "*i32", "q_lens_ptr": "*i32",
                 "pos0_ptr": "*i32", "m_ptr": "*fp32", "l_ptr": "*fp32", "lse_ptr": "*fp32",
                 "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "part_ptr": "*fp32",
                 "values_ptr": "*fp8e4nv", "scales_ptr": "*fp32"}


def _compile_all(cases: dict, cache: Path) -> dict[str, str]:
    """Every case compiled in one child without the interpreter (one torch and Triton import for
    them all), into the empty Triton cache `cache` (a kernel found in the user's cache would not
    be compiled): case name -> "" where it compiled, else the end of its error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, __file__, json.dumps(cases)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _compile_here(kernel_name: str, constants: dict, kv: str, data: str, options: dict) -> None:
    """Compile the kernel `module.name` with `constants` for its constexpr arguments: K/V pointers of type
    `kv`, the other data pointers `data`, indices int32 and strides int64; `options` (num_warps,
    num_stages) as a launch passes them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from megatron_lamina.attention import triton_paged, triton_prefill
    from megatron_lamina.model import fp8_quant_triton

    module, name = kernel_name.split(".")
    kernel = getattr({"triton_paged": triton_paged, "triton_prefill": triton_prefill,
                      "fp8_quant_triton": fp8_quant_triton}[module], name)
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in ("k_ptr", "v_ptr"):
            signature[name] = kv
        elif name.endswith("_ptr"):
            signature[name] = POINTER_TYPES.get(name, data)
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32" if name in ("splits", "heads") else "i64"
    # As a launch specializes them (the cache's strides are multiples of 16 and its tensors
    # 16-byte aligned): the loads vectorize and the pipeline and tensor-core paths are the
    # ones a GPU compiles, not the scalar fallback of unknown alignment.
    aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
               if signature[p.name] not in ("constexpr", "fp32") and not p.do_not_specialize
               and not getattr(p, "do_not_specialize_on_alignment", False)}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(kernel.arg_names.index(n),): v for n, v in constants.items()}, attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget(*HOPPER), options=options)
    assert compiled.asm["ptx"]  # lowered all the way


def _decode(fp8: bool, block_n: int, flags: dict | None = None, options: dict | None = None) -> list:
    return ["triton_paged._decode_kernel",
            {"GROUP": 4, "BLOCK_G": 16, "HEAD_DIM": 128, "BLOCK_N": block_n, "BLOCK_SIZE": 16,
             "PRECISION": "tf32", "FP8": fp8, "F16_DOTS": False, **(flags or {})},
            "*fp8e4nv" if fp8 else "*bf16", "*bf16", options or {}]


# The decode kernel's variants (paged_decode's fp8_dots and launch settings) as
# bench/fp8_speed.py's sweep launches them: tiles of 64 to 256 keys over blocks of 16, 4 and
# 8 warps, 2 to 7 stages (each cache's defaults: bf16 64 keys, 3 stages; e4m3 float16 dots,
# 128 keys, 5 stages).
DECODE_VARIANTS = {
    "bf16-64-s3": (False, {}, 64, {"num_stages": 3}),
    "bf16-128-w8-s4": (False, {}, 128, {"num_warps": 8, "num_stages": 4}),
    "fp8-f16-128-s5": (True, {"F16_DOTS": True}, 128, {"num_stages": 5}),
    "fp8-f16-128-s7": (True, {"F16_DOTS": True}, 128, {"num_stages": 7}),
    "fp8-f16-256-w8-s2": (True, {"F16_DOTS": True}, 256, {"num_warps": 8, "num_stages": 2}),
    "fp8-q-dots-64": (True, {}, 64, {}),
}

# name -> [kernel, constexpr values, K/V pointer type, other data pointers' type, launch options]
CASES = {
    # the decode kernel at its tile sizes, on each cache
    **{f"decode-{block_n}-{'fp8' if fp8 else 'bf16'}": _decode(fp8, block_n)
       for block_n in (16, 64, 128) for fp8 in (False, True)},
    **{f"decode-variant-{name}": _decode(fp8, block_n, flags, options)
       for name, (fp8, flags, block_n, options) in DECODE_VARIANTS.items()},
    # the splits' merge, with and without the log-sum-exp q-first needs
    **{f"merge-lse-{write_lse}": ["triton_paged._merge_kernel", {"HEAD_DIM": 128, "WRITE_LSE": write_lse},
                                  "*bf16", "*fp32", {}] for write_lse in (False, True)},
    **{f"prefill-{'fp8' if fp8 else 'bf16'}": [
        "triton_prefill._prefill_kernel", {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_M": 64, "BLOCK_N": 64,
                                           "BLOCK_SIZE": 16, "PRECISION": "tf32", "FP8": fp8},
        "*fp8e4nv" if fp8 else "*bf16", "*bf16", {}] for fp8 in (False, True)},
    # The fused FP8 quantization as quantize_rows_fused launches it at LLaMA-3's linear inputs:
    # 4096 and 14336 (8B) in one tile, 28672 (70B) in two passes; the hardware cast and the bitwise one.
    **{f"fp8-quant-{data[1:]}-{block}-{'one-tile' if one_tile else 'two-pass'}{'-emulated' if emulate else ''}": [
        "fp8_quant_triton._quantize_rows_kernel", {"BLOCK": block, "ONE_TILE": one_tile, "EMULATE_CAST": emulate},
        "*bf16", data, {"num_warps": 16}]
       for data, block, one_tile, emulate in (("*bf16", 4096, True, False), ("*bf16", 16384, True, False),
                                              ("*bf16", 16384, False, False), ("*fp32", 4096, True, False),
                                              ("*bf16", 4096, True, True), ("*bf16", 16384, False, True))},
}


@pytest.fixture(scope="module")
def compile_errors(tmp_path_factory) -> dict[str, str]:
    return _compile_all(CASES, tmp_path_factory.mktemp("triton-cache"))


@pytest.mark.parametrize("case", CASES)
def test_kernel_compiles_for_hopper(case, compile_errors):
    assert compile_errors[case] == "", compile_errors[case]


if __name__ == "__main__":
    errors = {}
    for name, case in json.loads(sys.argv[1]).items():
        try:
            _compile_here(*case)
            errors[name] = ""
        except Exception:  # noqa: BLE001  (the case's test shows it)
            errors[name] = traceback.format_exc()[-4000:]
    print(json.dumps(errors))
