"""The core-attention module of the model workers' layer spec: attention that runs elsewhere.

It takes the place of Megatron's `DotProductAttention` in `lamina_layer_spec` (layer.py). A
model worker never computes attention inside a layer: the pipeline (worker/pipeline.py)
hands each layer's q, k, v to an attention channel (transport/) between the layer's
`pre_attention` and `post_attention`, and the channel delivers them to the attention
workers that own the requests' KV cache (or, colocated, to the local paged cache). This
module only marks that seam in the spec; calling it is a mistake.
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.module import MegatronModule


class RemoteAttention(MegatronModule):
    def __init__(self, config, layer_number: int, **_megatron_kwargs: Any):
        # Megatron also passes attn_mask_type, attention_type, softmax_scale, pg_collection...:
        # the mask is always causal-by-position and the scale 1/sqrt(head_dim), decided where
        # attention runs, so they are accepted and not used.
        super().__init__(config=config)
        self.layer_index = layer_number - 1

    def forward(self, *args, **kwargs):
        raise RuntimeError("attention of a split layer runs through the pipeline's channel "
                           "(SplitTransformerLayer.pre_attention / post_attention), not inside forward")
