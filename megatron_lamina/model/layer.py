"""Megatron's `TransformerLayer`, split at the attention boundary, and the layer spec using it.

`lamina_layer_spec` is Megatron's local GPT layer spec with two substitutions: the layer
class is `SplitTransformerLayer` and the core attention is `RemoteAttention` bound to an
attention channel. `SplitTransformerLayer` adds `pre_attention` (input norm, fused QKV
projection, RoPE at per-token positions) and `post_attention` (output projection,
residual, MLP block); run back to back with attention in between they compute exactly what
the stock layer computes (same submodules, same bias-dropout-add, same MLP path), which lets
the pipeline driver pause a micro-batch while its attention is away.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_lamina.model.remote_attention import RemoteAttention
from megatron_lamina.model.rope import apply_rotary


class SplitTransformerLayer(TransformerLayer):
    rotate = staticmethod(apply_rotary)  # LlamaModel.fused_elementwise sets the compiled one

    def pre_attention(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """hidden [tokens, 1, hidden] -> residual, q [t,1,h,d], k, v [t,1,kv,d] (rotated)."""
        residual = hidden
        normed = self.input_layernorm(hidden)
        q, k, v = self.self_attention.get_query_key_value_tensors(normed)
        return residual, self.rotate(q, cos, sin), self.rotate(k, cos, sin), v

    def post_attention(self, residual: torch.Tensor, attention_out: torch.Tensor) -> torch.Tensor:
        """attention_out [tokens, 1, heads_local*head_dim] -> next layer's hidden states."""
        projected = self.self_attention.linear_proj(attention_out)
        hidden = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(
            projected, residual, self.hidden_dropout
        )
        return self._forward_mlp(hidden)

    @property
    def remote_attention(self) -> RemoteAttention:
        return self.self_attention.core_attention


def lamina_layer_spec(channel) -> ModuleSpec:
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.module = SplitTransformerLayer
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=RemoteAttention, params={"channel": channel}
    )
    return spec
