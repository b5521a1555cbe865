"""Megatron's `TransformerLayer`, split at the attention boundary, and the layer spec using it.

`lamina_layer_spec` is Megatron's local GPT layer spec with two substitutions: the layer
class is `SplitTransformerLayer` and the core attention is `RemoteAttention` (attention runs
elsewhere: on the attention workers, or on the local paged cache). `SplitTransformerLayer`
adds `pre_attention` (input norm, fused QKV projection, RoPE at per-token positions) and
`post_attention` (output projection, residual, MLP block), written with the layer's public
submodules (`input_layernorm`, `self_attention.linear_proj`, `self_attn_bda`,
`pre_mlp_layernorm`, `mlp`, `mlp_bda`); run back to back with attention in between they
compute exactly what the stock layer's `forward` computes (tests/test_split_layer.py
checks it against `TransformerLayer.forward`), which lets the pipeline pause a micro-batch
while its attention is away. The RoPE kernel is a construction-time choice (the spec's
`rotary` parameter): the plain one, or the compiled one CUDA graphs capture. So are FP8
weights (`fp8_weights`): the four projections become model/fp8_linear.py's subclasses.
"""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_lamina.model.fp8_linear import Fp8ColumnParallelLinear, Fp8RowParallelLinear
from megatron_lamina.model.remote_attention import RemoteAttention
from megatron_lamina.model.rope import apply_rotary

RotaryFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SplitTransformerLayer(TransformerLayer):
    def __init__(self, *args, rotary: RotaryFn = apply_rotary, **kwargs):
        super().__init__(*args, **kwargs)
        self.rotary = rotary

    def pre_attention(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """hidden [tokens, 1, hidden] -> residual, q [t,h,d], k, v [t,kv,d] (rotated)."""
        normed = self.input_layernorm(hidden)
        q, k, v = self.self_attention.get_query_key_value_tensors(normed)
        return hidden, self.rotary(q, cos, sin)[:, 0], self.rotary(k, cos, sin)[:, 0], v[:, 0]

    def post_attention(self, residual: torch.Tensor, attention_out: torch.Tensor) -> torch.Tensor:
        """attention_out [tokens, heads_local, head_dim] -> next layer's hidden states [t, 1, hidden]."""
        projected = self.self_attention.linear_proj(attention_out.reshape(attention_out.shape[0], 1, -1))
        bda = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)
        hidden = bda(projected, residual, self.hidden_dropout)
        mlp_out = self.mlp(self.pre_mlp_layernorm(hidden))
        return self.mlp_bda(self.training, self.config.bias_dropout_fusion)(mlp_out, hidden, self.hidden_dropout)


def lamina_layer_spec(rotary: RotaryFn = apply_rotary, fp8_weights: bool = False) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.module = SplitTransformerLayer
    spec.params = {**(spec.params or {}), "rotary": rotary}
    attention, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
    attention.core_attention = ModuleSpec(module=RemoteAttention)
    if fp8_weights:
        attention.linear_qkv, attention.linear_proj = Fp8ColumnParallelLinear, Fp8RowParallelLinear
        mlp.linear_fc1, mlp.linear_fc2 = Fp8ColumnParallelLinear, Fp8RowParallelLinear
    return spec
