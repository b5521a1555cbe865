"""Saves DeepSpeed ZeRO stage 1, 2 and 3 checkpoints with a real DeepSpeed engine, for the tests.

`save_on_rank(hf_dir, out_dir)` runs on each of two ranks (see tests/ckpt_save.py). Two gloo ranks (data parallel, DeepSpeed's CPU accelerator) load the transformers model in
HF_DIR, `deepspeed.initialize` it with ZeRO stage 1, 2 and 3 in turn, take one optimizer
step with learning rate 0 (the fp32 master weights stay the model's, so the tests' reference
outputs hold), and `engine.save_checkpoint(OUT_DIR/zeroN)`: `latest`, `global_step1/` with one
`*_optim_states.pt` per rank. As Hugging Face Trainer does, config.json and the tokenizer are
saved beside it. Then a Megatron-DeepSpeed-style model (its parameter names, the same
weights fused into Megatron's layout, the training args as its save_checkpoint stores them)
is saved with ZeRO stage 2 into OUT_DIR/megatron_deepspeed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch



def _deepspeed():
    import deepspeed
    import deepspeed.ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    # No C++ ops: otherwise the CPU accelerator compiles its shared-memory allreduce (minutes)
    # on first use, and probing the others runs the compiler. Plain gloo collectives are enough.
    deepspeed.ops.__compatible_ops__ = dict.fromkeys(ALL_OPS, False)
    return deepspeed


def _config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }


def megatron_deepspeed_module(hf_model) -> torch.nn.Module:
    """A module whose parameters are named as Megatron-DeepSpeed's GPTModel names them
    (TP=1), holding `hf_model`'s weights in Megatron's layout."""
    c = hf_model.config
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    d, qpk = c.hidden_size // heads, heads // kv
    hf = hf_model.state_dict()
    params = {
        "language_model.embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "language_model.encoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if not c.tie_word_embeddings:
        params["language_model.output_layer.weight"] = hf["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"language_model.encoder.layers.{i}."
        q = hf[h + "self_attn.q_proj.weight"].reshape(kv, qpk * d, -1)
        k = hf[h + "self_attn.k_proj.weight"].reshape(kv, d, -1)
        v = hf[h + "self_attn.v_proj.weight"].reshape(kv, d, -1)
        params[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
        params[m + "self_attention.query_key_value.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, c.hidden_size)
        params[m + "self_attention.dense.weight"] = hf[h + "self_attn.o_proj.weight"]
        params[m + "post_attention_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"]
        params[m + "mlp.dense_h_to_4h.weight"] = torch.cat(
            [hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]]
        )
        params[m + "mlp.dense_4h_to_h.weight"] = hf[h + "mlp.down_proj.weight"]
    module = torch.nn.Module()
    for name, value in params.items():
        owner = module
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, torch.nn.Parameter(value.clone()))
    return module


def megatron_deepspeed_args(config) -> argparse.Namespace:
    """Training arguments as Megatron-DeepSpeed names them (num_key_value_heads, ...)."""
    return argparse.Namespace(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        seq_length=128,
        use_rotary_position_embeddings=True,
        add_position_embedding=False,
        normalization="rmsnorm",
        layernorm_epsilon=config.rms_norm_eps,
        swiglu=True,
        untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        add_bias_linear=False,
        padded_vocab_size=config.vocab_size,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        tokenizer_type="HFTokenizer",
        fp16=False,
        bf16=False,
    )


def save_on_rank(hf_dir: str, out_dir: str) -> None:
    deepspeed = _deepspeed()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    deepspeed.init_distributed(dist_backend="gloo")
    rank, out = torch.distributed.get_rank(), Path(out_dir)
    ids = torch.arange(1, 9)[None, :]
    for stage in (1, 2, 3):
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=_config(stage))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        engine.save_checkpoint(str(out / f"zero{stage}"))
        if rank == 0:
            model.config.save_pretrained(out / f"zero{stage}")
            AutoTokenizer.from_pretrained(hf_dir).save_pretrained(out / f"zero{stage}")

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    module = megatron_deepspeed_module(hf_model)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=_config(2))
    client_state = {"args": megatron_deepspeed_args(hf_model.config), "checkpoint_version": 3.0, "iteration": 7}
    engine.save_checkpoint(str(out / "megatron_deepspeed"), tag="global_step7", client_state=client_state)
    torch.distributed.barrier()
