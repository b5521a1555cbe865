"""The core-attention module of the model workers: attention that runs somewhere else.

It takes the place of Megatron's `DotProductAttention` in the layer spec (`layer_spec.py`).
A model worker never computes attention itself: `send` hands this rank's q, k, v rows to an
`AttentionChannel` (transport/), which delivers them to the attention workers that own the
requests' KV cache (or, colocated, to the local paged cache), and `wait` returns the
attention output, laid out as the input of Megatron's row-parallel `linear_proj`. The split
into `send` and `wait` is what lets the pipeline driver run another micro-batch in between.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_lamina.plan import MicroBatch


class RemoteAttention(MegatronModule):
    def __init__(self, config, layer_number: int, channel, **_megatron_kwargs: Any):
        # Megatron also passes attn_mask_type, attention_type, softmax_scale, pg_collection...:
        # the mask is always causal-by-position and the scale 1/sqrt(head_dim), decided by the
        # attention workers, so they are accepted and not used.
        super().__init__(config=config)
        self.layer_index = layer_number - 1
        self.channel = channel

    def send(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, micro_batch: MicroBatch):
        """q: [tokens, 1, heads_local, head_dim]; k, v: [tokens, 1, kv_heads_local, head_dim]."""
        return self.channel.begin(self.layer_index, micro_batch, q[:, 0], k[:, 0], v[:, 0])

    def wait(self, pending) -> torch.Tensor:
        out = self.channel.finish(pending)  # [tokens, heads_local, head_dim]
        return out.reshape(out.shape[0], 1, -1)

    def forward(self, query, key, value, micro_batch: MicroBatch, **_unused):
        return self.wait(self.send(query, key, value, micro_batch))
