"""Saves a real Megatron-core GPTModel (TP=2, two gloo ranks) the way Megatron-LM does, for the tests.

`save_on_rank(canonical_dir, out_dir, sentencepiece_model)` runs on each of two ranks (see
tests/ckpt_save.py, which also runs the DeepSpeed saves on the same ranks). Each rank builds Megatron's `GPTModel` with the local layer spec, fills its TP shard from a
canonical checkpoint (so the model equals a transformers model the tests know), puts random
values in the rows of the padded vocabulary (as training leaves them), and writes:
    OUT_DIR/torch_dist/      Megatron-LM's --ckpt-format torch_dist layout: `dist_checkpointing.save`
                             of {"args", "iteration", "checkpoint_version", "model": sharded state dict},
                             latest_checkpointed_iteration.txt, iter_0000010/
    OUT_DIR/torch_dist_per_layer/  the same with Megatron's `singleton_local_shards` metadata: layers
                             kept apart (decoder.layers.N.*), fc1 split into ..._w / ..._v keys
    OUT_DIR/mcore_no_args/   a bare megatron-core `dist_checkpointing.save` of the model only
    OUT_DIR/torch_dist_wrapped/  torch_dist with the keys under a wrapper's prefix
                             (`module.model.decoder...`), as trainers that wrap the model save it
    OUT_DIR/legacy_tp2/      --ckpt-format torch: iter_0000010/mp_rank_0T/model_optim_rng.pt with
                             each rank's `model.state_dict()`
It runs under a script (not in the pytest process) because dist_checkpointing.save starts
worker processes, which needs a `__main__` guard; on CPU it also needs the two torch.cuda
calls of its save path patched (below).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


ITERATION = 10
TP = 2
VOCAB_DIVISIBLE_BY = 100  # Megatron pads the vocab to a multiple of this x TP: 256 -> 400


def megatron_lm_args(arch, tokenizer_model: str, tp: int, pp: int, ckpt_format: str) -> argparse.Namespace:
    """The training arguments Megatron-LM would have stored for this model (the ones that
    matter here, with Megatron-LM's names)."""
    multiple = VOCAB_DIVISIBLE_BY * tp
    return argparse.Namespace(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        group_query_attention=True,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        seq_length=128,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rotary_percent=1.0,
        rotary_interleaved=False,
        use_rope_scaling=False,
        normalization="RMSNorm",
        norm_epsilon=arch.rms_norm_eps,
        swiglu=True,
        untie_embeddings_and_output_weights=not arch.tie_word_embeddings,
        add_bias_linear=False,
        add_qkv_bias=False,
        apply_layernorm_1p=False,
        qk_layernorm=False,
        num_experts=None,
        make_vocab_size_divisible_by=VOCAB_DIVISIBLE_BY,
        padded_vocab_size=-(-arch.vocab_size // multiple) * multiple,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None,
        tokenizer_type="GPTSentencePieceTokenizer",
        tokenizer_model=tokenizer_model,
        vocab_size=None,
        bf16=False,
        fp16=False,
        params_dtype=torch.float32,
        ckpt_format=ckpt_format,
    )


def save_on_rank(canonical_dir: str, out_dir: str, tokenizer_model: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    # dist_checkpointing's save path synchronizes CUDA and puts a flag tensor on the current
    # CUDA device; on CPU both become no-ops / the CPU.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_lamina.architecture import read_architecture
    from megatron_lamina.checkpoint.loader import CheckpointShardLoader
    from megatron_lamina.model.llama import transformer_config

    rank, out = dist.get_rank(), Path(out_dir)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    arch = read_architecture(canonical_dir)
    args = megatron_lm_args(arch, tokenizer_model, TP, 1, "torch_dist")
    model = GPTModel(
        transformer_config(arch, torch.float32, TP),
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
    )
    CheckpointShardLoader(canonical_dir, rank, TP, make_vocab_size_divisible_by=VOCAB_DIVISIBLE_BY).load_into(model)
    rows = args.padded_vocab_size // TP
    torch.manual_seed(1000 + rank)
    with torch.no_grad():  # the padding rows: trained-on-nothing values, never zeros
        for weight in (model.embedding.word_embeddings.weight, model.output_layer.weight):
            if weight is not None:
                padding = torch.arange(rank * rows, (rank + 1) * rows) >= arch.vocab_size
                weight[padding] = torch.randn_like(weight[padding])

    torch_dist = out / "torch_dist" / f"iter_{ITERATION:07d}"
    per_layer = out / "torch_dist_per_layer" / f"iter_{ITERATION:07d}"
    no_args = out / "mcore_no_args"
    wrapped = out / "torch_dist_wrapped"
    legacy = out / "legacy_tp2" / f"iter_{ITERATION:07d}" / f"mp_rank_{rank:02d}"
    if rank == 0:
        for directory in (torch_dist, per_layer, no_args, wrapped):
            directory.mkdir(parents=True)
        for save_dir in (out / "torch_dist", out / "legacy_tp2"):
            save_dir.mkdir(parents=True, exist_ok=True)
            (save_dir / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    legacy.mkdir(parents=True)
    dist.barrier()

    state = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION}
    dist_checkpointing.save({**state, "model": model.sharded_state_dict()}, str(torch_dist))
    per_layer_model = model.sharded_state_dict(metadata={"singleton_local_shards": True})
    dist_checkpointing.save({**state, "model": per_layer_model}, str(per_layer))
    dist_checkpointing.save(model.sharded_state_dict(), str(no_args))
    dist_checkpointing.save({**state, "model": model.sharded_state_dict(prefix="module.model.")}, str(wrapped))
    legacy_args = megatron_lm_args(arch, tokenizer_model, TP, 1, "torch")
    rng_state = [{"random_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}]
    torch.save(
        {**state, "args": legacy_args, "model": model.state_dict(), "rng_state": rng_state},
        legacy / "model_optim_rng.pt",
    )
    dist.barrier()
