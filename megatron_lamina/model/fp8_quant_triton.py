"""Per-token FP8 quantization of a linear's input on the GPU, in one Triton kernel: what
`fp8_matmul` (model/fp8_linear.py) runs before `torch._scaled_mm` on CUDA.

`fp8.quantize_rows` is the rule; in torch it is eight kernels and several full passes over the
activations (abs, amax, float, clamp, divide, float, divide, clamp, cast), four times a layer,
which cost more than FP8 weights' halved bytes save. Here one program per row reads the row,
takes its abs-max, writes the float32 scale, and writes the e4m3 values: a row that fits one
tile (`MAX_BLOCK`: every input of LLaMA-3-8B's linears) is read once and kept in registers; a
longer one is read twice, the second time from L2. The bits are `quantize_rows`' own: each
division is correctly rounded (`div_rn`; Triton's `/` is an approximate division), the clamp
keeps a NaN a NaN, and the cast rounds to nearest even. Shapes are static and nothing is read
back to the host, so the engine's CUDA graphs capture it.

Under Triton's interpreter (CPU tensors: the tests) the cast is computed from the float's bits
(`_e4m3_bits`, torch's own conversion), because the interpreter's float8 conversion rounds ties
away from zero and loses mantissa carries; on a GPU it is one instruction
(cvt.rn.satfinite.e4m3x2.f32). `emulate_cast=True` runs the bitwise cast on a GPU too, where the
GPU test holds it to torch as well. No Triton on the machine (CPU-only install): importing this
module still works; `fp8_matmul` calls it only on CUDA tensors.
"""

from __future__ import annotations

import torch

from megatron_lamina.fp8 import FP8, FP8_MAX, SCALE_FLOOR

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install
    triton = None

# The longest row kept in registers (16 warps, 32 floats a thread); longer rows (LLaMA-3-70B's
# fc2 input, 28672) take the two-pass loop.
MAX_BLOCK = 16384

if triton is not None:
    # A kernel reads only constexpr globals (a real compile refuses a plain float).
    FP8_MAX_K = tl.constexpr(FP8_MAX)
    SCALE_FLOOR_K = tl.constexpr(SCALE_FLOOR)

    @triton.jit
    def _e4m3_bits(v):
        """float32 v in [-448, 448] (or NaN) -> its e4m3 code, rounded to nearest even, as torch's
        c10 conversion computes it from the bits."""
        bits = v.to(tl.uint32, bitcast=True)
        sign = bits & 0x80000000
        mag = bits ^ sign
        # Below 2^-6 (e4m3's subnormals): adding 2^14 rounds to a multiple of 2^-9, e4m3's
        # subnormal step, to nearest even; the code is that multiple.
        subnormal = (mag.to(tl.float32, bitcast=True) + 16384.0).to(tl.uint32, bitcast=True) - 0x46800000
        # Normal: rebias the exponent (127 -> 7: adding 0xC4000000 wraps to subtracting 120 << 23)
        # and round at bit 20 to nearest even (0x7FFFF, plus 1 when the kept bit is odd).
        normal = (mag + 0xC407FFFF + ((mag >> 20) & 1)) >> 20
        code = tl.where(mag < 0x3C800000, subnormal, normal)
        code = tl.where(mag > 0x7F800000, 0x7F, code)  # NaN
        return (code | (sign >> 24)).to(tl.uint8)

    @triton.jit
    def _to_e4m3(x, scale, EMULATE_CAST: tl.constexpr):
        """float32 x / scale, clamped to e4m3's range, cast to e4m3: quantize_rows' steps."""
        q = tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX_K, FP8_MAX_K, propagate_nan=tl.PropagateNan.ALL)
        if EMULATE_CAST:
            return _e4m3_bits(q).to(tl.float8e4nv, bitcast=True)
        return q.to(tl.float8e4nv, fp_downcast_rounding="rtne")

    @triton.jit
    def _quantize_rows_kernel(x_ptr, values_ptr, scales_ptr, n, stride_x, stride_values,
                              BLOCK: tl.constexpr, ONE_TILE: tl.constexpr, EMULATE_CAST: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        values_row = values_ptr + row * stride_values
        offs = tl.arange(0, BLOCK)
        # Padding reads 0, which leaves an abs-max unchanged.
        if ONE_TILE:
            x = tl.load(x_row + offs, mask=offs < n, other=0.0).to(tl.float32)
            amax = tl.max(tl.abs(x), axis=0)
        else:
            amax = 0.0
            for start in range(0, n, BLOCK):
                tile = tl.load(x_row + start + offs, mask=start + offs < n, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.abs(tile), axis=0))
        scale = tl.math.div_rn(tl.maximum(amax, SCALE_FLOOR_K), FP8_MAX_K)
        tl.store(scales_ptr + row, scale)
        if ONE_TILE:
            tl.store(values_row + offs, _to_e4m3(x, scale, EMULATE_CAST), mask=offs < n)
        else:
            for start in range(0, n, BLOCK):
                tile = tl.load(x_row + start + offs, mask=start + offs < n, other=0.0).to(tl.float32)
                tl.store(values_row + start + offs, _to_e4m3(tile, scale, EMULATE_CAST), mask=start + offs < n)


def quantize_rows_fused(x: torch.Tensor, max_block: int = MAX_BLOCK,
                        emulate_cast: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, n] (bf16, fp16 or float32) -> (e4m3 [rows, n], float32 scales [rows, 1]): the
    bits of `fp8.quantize_rows(x)`, in one kernel. `max_block` bounds the tile (the tests make
    rows longer than it to run the two-pass loop); `emulate_cast` defaults to the bitwise cast
    off a GPU only (the interpreter)."""
    assert x.dim() == 2 and x.shape[1] > 0, x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, n = x.shape
    values = torch.empty(rows, n, dtype=FP8, device=x.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows == 0:  # a grid of no programs is not a launch
        return values, scales
    block = min(triton.next_power_of_2(n), max_block)
    _quantize_rows_kernel[(rows,)](
        x, values, scales, n, x.stride(0), values.stride(0),
        BLOCK=block, ONE_TILE=n <= block, EMULATE_CAST=not x.is_cuda if emulate_cast is None else emulate_cast,
        num_warps=min(16, max(1, block // 256)))
    return values, scales
