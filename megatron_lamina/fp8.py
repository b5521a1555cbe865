"""Float8 e4m3 in one place: the dtype, its range, and whether a device can compute with it.

The FP8 KV cache (attention/kv_cache.py, read by the Triton kernels) and the FP8 weights of
the model workers (model/fp8_linear.py, written by `lamina convert --weight-dtype fp8_e4m3`)
both store `torch.float8_e4m3fn` with float32 scales. On a CPU both dequantize (CI runs
the same numerics); on CUDA the Triton kernels need e4m3 loads (compute capability 8.9+)
and the matmuls `torch._scaled_mm` with row-wise scales (9.0+, Hopper). Asking for either on
a GPU that cannot is one `ConfigError`, never a silent fallback.
`quantize_rows` is the one scaling rule of weights (a row is an output channel, scaled when
the checkpoint is written, or at load) and of activations (a row is a token, scaled on every
call); `quantize_weight` applies it to a linear weight, for the converter and the loader alike.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP8_NAME = "fp8_e4m3"  # the name in the config and the checkpoint's config.json
SCALE_FLOOR = 1e-12  # an all-zero row's amax, so that its scale is not 0

# Compute capability each use needs: e4m3 loads in Triton; row-wise scaled FP8 matmuls.
KV_CAPABILITY = (8, 9)
MATMUL_CAPABILITY = (9, 0)


def require_fp8(device: torch.device, capability: tuple[int, int], what: str, instead: str) -> None:
    """ConfigError (one line) when `device` is a GPU older than `capability`."""
    if device.type != "cuda":
        return
    from megatron_lamina.config import ConfigError

    have = torch.cuda.get_device_capability(device)
    if have < capability:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"{what} needs a GPU of compute capability {capability[0]}.{capability[1]} or newer; "
                          f"{name} is {have[0]}.{have[1]}; {instead}")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, n] -> (e4m3 [rows, n], float32 scales [rows, 1]) with x ~ q * scale: each row's
    largest magnitude maps to e4m3's largest value (an all-zero row gets a tiny scale, q 0).
    Every step rounds once, in float32: scale = max(amax, SCALE_FLOOR) / 448 and x / scale
    correctly rounded, clamped to +-448, cast to e4m3 to nearest even; the fused CUDA kernel
    (model/fp8_quant_triton.py) computes these same bits."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=SCALE_FLOOR)
    # Divided by a tensor, not the number 448: CUDA torch turns a division by a Python number
    # into a multiplication by its float32 reciprocal, one bit off the CPU's division at times.
    scale = amax / torch.full_like(amax, FP8_MAX)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole linear weight [out, in] -> (e4m3 [out, in], float32 scales [out]), one scale
    per output channel: what `lamina convert --weight-dtype fp8_e4m3` writes and what
    `model.weight_dtype: fp8_e4m3` loads, so that the two serve the same numbers."""
    values, scales = quantize_rows(weight)
    return values, scales.reshape(-1)
