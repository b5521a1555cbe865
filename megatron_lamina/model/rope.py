"""Rotary position embedding with per-token positions (model workers, pre-attention).

Megatron's `GPTModel` derives rotary angles from a contiguous sequence and calls CUDA on the
way; a serving step instead mixes tokens of many requests at arbitrary positions. This module
computes cos/sin for a vector of positions and rotates q and k in the Hugging Face
"rotate half" convention that the canonical checkpoint uses, with `rope_theta` and LLaMA-3
frequency scaling (`RopeScaling`). Angles are computed in float32 and cast to the
activations' dtype, as the reference implementation does. CUDA graphs capture the
`torch.compile`d rotation (`compiled_rotary`, one kernel); eager steps run the plain one.
"""

from __future__ import annotations

import math

import torch

from megatron_lamina.architecture import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    # LLaMA-3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None):
        super().__init__()
        self.register_buffer(
            "inv_freq", inverse_frequencies(head_dim, theta, scaling), persistent=False
        )

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [tokens, 1, 1, head_dim] for q/k laid out [tokens, 1, heads, head_dim]."""
        angles = positions.to(self.inv_freq.device, torch.float32)[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)[:, None, None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def compiled_rotary():
    """`apply_rotary` as one kernel per call (torch.compile, any token count): on a GPU the
    eager version is five elementwise kernels over a strided view of the QKV output. Each
    compiled call costs host time (its guards), so only CUDA graphs, which replay
    the kernel without the host, use it."""
    return torch.compile(apply_rotary, dynamic=True)
