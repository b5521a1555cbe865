"""`SplitTransformerLayer` (model/layer.py) computes what Megatron's stock `TransformerLayer`
computes: pre_attention, attention, post_attention back to back against the stock layer's
`forward`, on the same random weights.

Both layers come from Megatron's local GPT layer spec (the split one through
`lamina_layer_spec`); the core attention of the stock one is a plain causal softmax attention
module, which the split path calls between its halves. RoPE is the identity here (cos 1,
sin 0, no rotary embedding given to the stock layer): the rotation itself is checked against
transformers in the layout tests. A change in Megatron's layer (a new residual, norm or
bias-dropout-add) that the split layer does not follow fails this test.
"""

from __future__ import annotations

import math

import torch
from spawn_ranks import run_ranks


def _compare(tp_size: int):
    import torch.distributed as dist
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megatron_lamina.architecture import ModelArchitecture
    from megatron_lamina.model.layer import lamina_layer_spec
    from megatron_lamina.model.llama import transformer_config

    def causal(q, k, v):  # q [s, h, d], k, v [s, kv, d] -> [s, h, d]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scores = torch.einsum("shd,thd->hst", q, k) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).triu(1), float("-inf"))
        return torch.einsum("hst,thd->shd", scores.softmax(-1), v)

    class CausalAttention(MegatronModule):
        def __init__(self, config, layer_number, **_):
            super().__init__(config=config)

        def forward(self, query, key, value, attention_mask, **_):  # [s, b=1, heads, d] -> [s, 1, heads*d]
            return causal(query[:, 0], key[:, 0], value[:, 0]).reshape(query.shape[0], 1, -1)

    dist.init_process_group("gloo")
    arch = ModelArchitecture(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=1,
                             num_attention_heads=8, num_kv_heads=4, head_dim=8, max_position_embeddings=64)
    config = transformer_config(arch, torch.float32, dist.get_world_size())
    groups = ProcessGroupCollection()
    groups.tp, groups.cp, groups.pp = dist.group.WORLD, None, None
    stock_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    stock_spec.submodules.self_attention.submodules.core_attention = ModuleSpec(module=CausalAttention)
    stock = build_module(stock_spec, config=config, layer_number=1, pg_collection=groups).eval()
    split = build_module(lamina_layer_spec(), config=config, layer_number=1, pg_collection=groups).eval()
    torch.manual_seed(0)  # both layers get the same weights (the same values of this rank's shards)
    weights = {name: torch.randn(p.shape) * 0.2 + (1.0 if "norm" in name else 0.0)
               for name, p in stock.state_dict().items() if not name.endswith("_extra_state")}
    stock.load_state_dict(weights, strict=False)
    split.load_state_dict(weights, strict=False)
    hidden = torch.randn(11, 1, arch.hidden_size)
    with torch.no_grad():
        want, _ = stock(hidden, attention_mask=None)
        ones, zeros = torch.ones(11, 1, 1, arch.head_dim), torch.zeros(11, 1, 1, arch.head_dim)
        residual, q, k, v = split.pre_attention(hidden, ones, zeros)
        got = split.post_attention(residual, causal(q, k, v))
    return (got - want).abs().max().item(), want.abs().max().item()


def test_split_layer_equals_the_stock_layer():
    error, scale = run_ranks(_compare, 1, 1)
    assert scale > 0.1 and error < 1e-5 * scale, (error, scale)


def test_split_layer_equals_the_stock_layer_at_tp2():
    error, scale = run_ranks(_compare, 2, 2)
    assert scale > 0.1 and error < 1e-5 * scale, (error, scale)
