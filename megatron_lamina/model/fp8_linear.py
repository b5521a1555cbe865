"""FP8 weights for the model workers: Megatron's column- and row-parallel linears with e4m3
weights and a float32 scale per output channel (`lamina convert --weight-dtype fp8_e4m3`).

`Fp8ColumnParallelLinear` and `Fp8RowParallelLinear` subclass Megatron's two parallel linears
and replace one thing, the matmul (`_forward_impl`, the seam both call with their local input
shard): everything around it (the input copy, the row-parallel all-reduce, the bias) stays
Megatron's. The weight parameter is e4m3 `[out_local, in_local]` and `weight_scale` float32
`[out_local]`; the loader fills both by name (checkpoint/loader.py: a scale shards with its
rows: split with a column-parallel weight's rows, whole beside a row-parallel weight, whose
rows are not split). The layer spec swaps them in for the QKV, output, fc1 and fc2
projections (model/layer.py); norms, embeddings, the LM head and attention stay in the model
dtype.

The matmul quantizes its input per token (`fp8.quantize_rows`, dynamic, as vLLM's FP8 does;
on CUDA its bits in one fused kernel, model/fp8_quant_triton.py) and computes x_q W_q^T scaled
by the token's and the channel's scales: on CUDA in one `torch._scaled_mm` with row-wise scales
(Hopper; captured by the CUDA graphs like any kernel), elsewhere dequantized and multiplied in
float32, so that CPU runs (CI) compute the same numbers the GPU path rounds to: the GPU's
product is the float32 one rounded to bf16 (within 2^-8 of each value), up to the order of
its float32 sums.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_lamina.fp8 import FP8, quantize_rows
from megatron_lamina.model.fp8_quant_triton import quantize_rows_fused


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] (model dtype) times e4m3 weight [out, in] with scales [out] -> [..., out]."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], weight.shape[0])
    # On CUDA the torch rule's eight kernels cost more than FP8 halves of the weights' bytes save.
    xq, x_scale = (quantize_rows_fused if x.is_cuda else quantize_rows)(rows)
    out = scaled_matmul(xq, x_scale, weight, weight_scale)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def scaled_matmul(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                  weight_scale: torch.Tensor) -> torch.Tensor:
    """e4m3 x [rows, in] with scales [rows, 1] times e4m3 weight [out, in] with scales [out]:
    bf16 [rows, out] on CUDA, float32 elsewhere."""
    if xq.is_cuda:
        # Row-wise scaling: the second operand column-major (W^T of a row-major W), bf16 out.
        return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale[None, :],
                                out_dtype=torch.bfloat16)
    return (xq.float() * x_scale) @ (weight.float() * weight_scale[:, None]).t()


class _Fp8Weight:
    """The e4m3 weight and its scales, in place of the parent's weight parameter."""

    def _use_fp8_weight(self) -> None:
        out_features, in_features = self.weight.shape
        self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(torch.ones(out_features), requires_grad=False)
        # LlamaModel casts every other parameter to the model dtype; these keep theirs.
        self.weight.keeps_dtype = self.weight_scale.keeps_dtype = True

    def _forward_impl(self, input, weight, bias=None, **_):
        out = fp8_matmul(input, weight, self.weight_scale)
        return out if bias is None else out + bias


class Fp8ColumnParallelLinear(_Fp8Weight, ColumnParallelLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert self.weight is not None, "an FP8 linear owns its weight (no tied weight)"
        self._use_fp8_weight()


class Fp8RowParallelLinear(_Fp8Weight, RowParallelLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._use_fp8_weight()
