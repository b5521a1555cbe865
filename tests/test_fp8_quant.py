"""The fused per-token FP8 quantization (model/fp8_quant_triton.py) against its rule,
`fp8.quantize_rows`, bit for bit: random bfloat16, float16 and float32 rows over six decades of
magnitude, an all-zero row, odd lengths, rows longer than a tile (the two-pass loop, its last
tile masked), a strided input, no rows, and every e4m3 rounding tie (to even, with and without
a carry into the exponent, subnormal, negative).

Without a CUDA device the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1
before Triton is imported), where its cast is the bitwise one; on a GPU the same tests run the
hardware cast. The compile for sm_90 is in test_triton_compile.py, the CUDA comparison and the
matmul in test_gpu.py.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from megatron_lamina.fp8 import FP8, FP8_MAX, quantize_rows  # noqa: E402
from megatron_lamina.model import fp8_quant_triton  # noqa: E402
from megatron_lamina.model.fp8_quant_triton import quantize_rows_fused  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _interpreted():
    if DEVICE == "cpu" and type(fp8_quant_triton._quantize_rows_kernel).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file alone")


def assert_same_bits(x: torch.Tensor, max_block: int = fp8_quant_triton.MAX_BLOCK) -> None:
    """The kernel's values and scales are quantize_rows' bits (a NaN is any NaN: its sign bit is
    the division's, which the hardware picks)."""
    values, scales = quantize_rows_fused(x, max_block=max_block)
    want_values, want_scales = quantize_rows(x)
    assert values.dtype == FP8 and values.shape == x.shape and scales.shape == (x.shape[0], 1)
    assert scales.dtype == torch.float32 and torch.equal(scales, want_scales)
    got, want = values.view(torch.uint8) & 0x7F, want_values.view(torch.uint8) & 0x7F
    nan = want == 0x7F
    assert torch.equal(got == 0x7F, nan)
    assert torch.equal(values.view(torch.uint8)[~nan], want_values.view(torch.uint8)[~nan]), \
        (values.view(torch.uint8) != want_values.view(torch.uint8)).nonzero()[:8].tolist()


def random_rows(rows: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal rows scaled from 1e-6 to 1e3 (bf16's and float32's whole working range of
    activations), the first all zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * torch.logspace(-6, 3, rows)[:, None]
    x[0] = 0
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("rows, n, max_block", [
    (7, 37, None),      # one tile, odd length
    (5, 4096, None),    # one tile, a model's hidden size
    (4, 1000, 128),     # two passes over 8 tiles, the last masked
    (3, 131, 16),       # two passes over 9 tiles, one element in the last
    (6, 1, None),       # one element a row
])
def test_fused_equals_quantize_rows(dtype, rows, n, max_block):
    x = random_rows(rows, n, dtype, seed=n)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    assert_same_bits(x, max_block or fp8_quant_triton.MAX_BLOCK)


def test_strided_rows():
    """A column slice of a wider tensor: rows apart by the wider stride."""
    wide = random_rows(6, 300, torch.bfloat16, seed=1)
    assert wide[:, 7:250].stride() == (300, 1)
    assert_same_bits(wide[:, 7:250])
    assert_same_bits(wide[:, 7:250], max_block=64)


def test_no_rows():
    values, scales = quantize_rows_fused(torch.empty(0, 4096, dtype=torch.bfloat16, device=DEVICE))
    assert values.shape == (0, 4096) and values.dtype == FP8 and scales.shape == (0, 1)


def e4m3_ties() -> torch.Tensor:
    """Every value halfway between two neighbouring e4m3 values, and a float32 step either side,
    both signs, in rows that also hold 448 (so the scale is exactly 1 and x / scale is x): the
    cast must round ties to even (carrying into the exponent where the mantissa is all ones,
    from the subnormals into the normals too)."""
    codes = torch.arange(0, 0x7E, dtype=torch.uint8)  # 0 .. the value below 448
    low = codes.view(FP8).float()
    high = (codes + 1).view(FP8).float()
    mid = (low + high) / 2  # exact in float32: e4m3's 3 mantissa bits fit easily
    step = torch.nextafter(mid, torch.full_like(mid, float("inf")))
    below = torch.nextafter(mid, torch.zeros_like(mid))
    values = torch.cat([mid, step, below, low])
    values = torch.cat([values, -values])
    per_row = 63
    pad = (-values.numel()) % per_row
    rows = torch.cat([values, torch.zeros(pad)]).view(-1, per_row)
    return torch.cat([rows, torch.full((rows.shape[0], 1), FP8_MAX)], dim=1)


@pytest.mark.parametrize("max_block", [64, 16], ids=["one_tile", "two_pass"])
def test_rounding_ties_to_even(max_block):
    x = e4m3_ties().to(DEVICE)
    assert torch.equal(quantize_rows(x)[1], torch.ones(x.shape[0], 1, device=DEVICE))
    assert_same_bits(x, max_block)


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")  # the interpreter's inf / inf
def test_extremes():
    """Signed zeros, float32 subnormals (far below e4m3's smallest step once scaled), a row of
    only subnormals (its scale floored), an infinity (its row's scale infinite, that element NaN,
    the others 0), a tiny row beside a huge one."""
    tiny = 2.0 ** -140
    x = torch.tensor([
        [-0.0, 0.0, tiny, -tiny, 1.0, -448.0, 3e-38, 1e30],
        [tiny, -tiny, 2 * tiny, 0.0, -0.0, tiny, tiny, -tiny],
        [float("inf"), 1.0, -2.0, 0.0, -0.0, 5.0, 1e-30, 7.0],
        [1e-30, -3e-30, 2e-30, 0.0, 1e-31, -1e-30, 4e-30, 5e-30],
    ], device=DEVICE)
    assert_same_bits(x)
