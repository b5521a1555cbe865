"""q-first decode attention (runtime.q_first; the Lamina paper's overlap, issue 16): the
exact merge of each new token's own term into attention over the tokens cached before it.

With q-first a model worker sends q before k, v (transport/p2p.py). For a micro-batch of
decode rows (one new token per request) the attention worker attends q to the *cached*
context as soon as q arrives (the backends' `attend_cached`: reference.py in torch on CPU,
gpu.py through the Triton decode kernel on CUDA), keeping per row and query head the partial
output o_c and the natural log-sum-exp lse_c of the scaled scores of the cached keys. When
k, v arrive, `append_and_merge` writes them to the cache and adds the new token's term
s_n = scale * q . k_new:
    m = max(lse_c, s_n)
    o = (exp(lse_c - m) * o_c + exp(s_n - m) * v_new) / (exp(lse_c - m) + exp(s_n - m))
which is softmax attention over the whole context, exactly (up to rounding). A request
with no cached token has o_c = 0 and lse_c = -inf, so o = v_new. This module is the one
place of that math; worker/attention_worker.py runs the sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_lamina.attention.kv_cache import PagedKVCache


@dataclass
class CachedPartial:
    """Attention of decode rows over their cached tokens only."""

    out: torch.Tensor  # [rows, heads, head_dim] float32; 0 for a row with no cached token
    lse: torch.Tensor  # [rows, heads] float32, natural log-sum-exp of the scaled scores; -inf: none


def merge_new_token(partial: CachedPartial, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [rows, heads, d], the new tokens' k, v [rows, kv_heads, d] -> o [rows, heads, d]
    float32 over cached and new tokens. GQA: query head h uses KV head h // (heads / kv_heads)."""
    group = q.shape[1] // k.shape[1]
    k_new = k.float().repeat_interleave(group, dim=1)
    v_new = v.float().repeat_interleave(group, dim=1)
    s_new = (q.float() * k_new).sum(-1) / math.sqrt(q.shape[-1])    # [rows, heads], finite
    m = torch.maximum(partial.lse, s_new)
    w_cached, w_new = torch.exp(partial.lse - m), torch.exp(s_new - m)  # exp(-inf) = 0: no cached token
    return (w_cached[..., None] * partial.out + w_new[..., None] * v_new) / (w_cached + w_new)[..., None]


def append_and_merge(cache: PagedKVCache, layer: int, new_slots: torch.Tensor, partial: CachedPartial,
                     q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Write the new tokens' k, v at `new_slots` (one per row), then merge -> o like q."""
    cache.write(layer, new_slots, k, v)
    return merge_new_token(partial, q, *cache.as_stored(layer, k, v)).to(q.dtype)
