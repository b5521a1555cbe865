"""The model workers' LLaMA-family decoder, assembled from Megatron-core's parallel pieces.

Read it top to bottom like gpt-fast's model: a vocab-parallel embedding, `num_layers`
`SplitTransformerLayer`s built from `lamina_layer_spec`, the final RMSNorm and a
column-parallel LM head (tied to the embedding or not). Module names equal the canonical
checkpoint's tensor names, so the loader fills it by name. Tensor parallelism runs over the
process group given here (model-worker ranks only): Megatron's layers receive it through a
`ProcessGroupCollection`, so attention-worker ranks never join a Megatron group.

The forward pass is cut at the attention boundaries into stages: `first_stage` (the
embedding, the RoPE tables, layer 0's pre-attention), `middle_stage(l)` (layer l-1's
post-attention and layer l's pre-attention), `last_stage` (the last post-attention) and
`head` (final norm and LM head over the rows whose logits are sampled, gathered over the
full vocabulary on every TP rank). Each stage but the last two ends with the q, k, v that go
to attention, so between two stages a micro-batch waits for its attention output. The
pipeline (worker/pipeline.py) runs these stages eagerly or replays CUDA graphs of them
(worker/stage_graphs.py, worker/cuda_graphs.py), so the math has one code path.

`fused_elementwise` is a construction-time choice: SwiGLU as Megatron's compiled
`bias_activation_fusion` kernel and RoPE as `compiled_rotary`, one kernel each instead of
chains of eager ones. The engine turns it on when the model runs from CUDA graphs, which
hide the compiled functions' host cost (their guards, on every call) that eager steps would pay.
`fp8_weights` is one too: the layers' four projections hold e4m3 weights with per-channel
scales (model/fp8_linear.py), as a checkpoint converted with `--weight-dtype fp8_e4m3` stores them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_lamina.architecture import ModelArchitecture
from megatron_lamina.model.layer import lamina_layer_spec
from megatron_lamina.model.rope import RotaryEmbedding, apply_rotary, compiled_rotary


def transformer_config(arch: ModelArchitecture, dtype: torch.dtype, tp_size: int,
                       fused_elementwise: bool = False) -> TransformerConfig:
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp_size,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Inference on weights loaded from a checkpoint; no Apex/Transformer-Engine kernels.
        use_cpu_initialization=True,
        perform_initialization=False,
        bias_activation_fusion=fused_elementwise,  # Megatron's compiled SwiGLU
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )


class LlamaModel(torch.nn.Module):
    def __init__(
        self,
        arch: ModelArchitecture,
        dtype: torch.dtype,
        tp_group: torch.distributed.ProcessGroup,
        padded_vocab_size: int,
        fused_elementwise: bool = False,
        fp8_weights: bool = False,
    ):
        super().__init__()
        self.arch = arch
        self.config = config = transformer_config(arch, dtype, tp_group.size(), fused_elementwise)
        groups = ProcessGroupCollection()
        groups.tp, groups.cp, groups.pp = tp_group, None, None

        self.embedding = torch.nn.Module()
        self.embedding.word_embeddings = VocabParallelEmbedding(
            padded_vocab_size, arch.hidden_size, init_method=config.init_method,
            config=config, tp_group=tp_group,
        )
        spec = lamina_layer_spec(compiled_rotary() if fused_elementwise else apply_rotary, fp8_weights)
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList(
            build_module(spec, config=config, layer_number=i + 1, pg_collection=groups)
            for i in range(arch.num_layers)
        )
        self.decoder.final_layernorm = build_module(
            spec.submodules.input_layernorm, config=config,
            hidden_size=arch.hidden_size, eps=arch.rms_norm_eps,
        )
        self.output_layer = ColumnParallelLinear(
            arch.hidden_size, padded_vocab_size, config=config, init_method=config.init_method,
            bias=False, gather_output=False, skip_weight_param_allocation=arch.tie_word_embeddings,
            tp_group=tp_group,
        )
        self.tp_group = tp_group
        self.rotary = RotaryEmbedding(arch.head_dim, arch.rope_theta, arch.rope_scaling)
        # Megatron's torch norms are created in the default dtype; in bf16 a float32 norm weight
        # sends rms_norm down a slow mixed-dtype path. Every parameter takes the model dtype
        # (the rotary frequencies, a buffer, stay float32; FP8 weights and their scales keep theirs).
        for param in self.parameters():
            if not getattr(param, "keeps_dtype", False):
                param.data = param.data.to(dtype)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.rotary.inv_freq.device

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    # The stages. Shapes: token_ids, positions [tokens]; residual, hidden [tokens, 1, hidden];
    # cos, sin [tokens, 1, 1, head_dim]; q, attention_out [tokens, heads_local, head_dim];
    # k, v [tokens, kv_heads_local, head_dim].

    def first_stage(self, token_ids: torch.Tensor, positions: torch.Tensor):
        """Embedding, RoPE tables, layer 0's pre-attention -> residual, cos, sin, q, k, v."""
        # [1, tokens] -> [1, tokens, hidden] -> Megatron's [sequence, batch=1, hidden]
        hidden = self.embedding.word_embeddings(token_ids[None, :]).transpose(0, 1)
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        residual, q, k, v = self.decoder.layers[0].pre_attention(hidden, cos, sin)
        return residual, cos, sin, q, k, v

    def middle_stage(self, layer: int, residual: torch.Tensor, attention_out: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor):
        """Layer `layer - 1`'s post-attention, layer `layer`'s pre-attention -> residual, q, k, v."""
        hidden = self.decoder.layers[layer - 1].post_attention(residual, attention_out)
        return self.decoder.layers[layer].pre_attention(hidden, cos, sin)

    def last_stage(self, residual: torch.Tensor, attention_out: torch.Tensor) -> torch.Tensor:
        """The last layer's post-attention -> hidden states [tokens, 1, hidden]."""
        return self.decoder.layers[-1].post_attention(residual, attention_out)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: hidden [rows, 1, hidden] -> logits [rows, vocab]."""
        if hidden.shape[0] == 0:  # a micro-batch of non-final prefill chunks only
            return hidden.new_empty(0, self.arch.vocab_size)
        hidden = self.decoder.final_layernorm(hidden)
        tied = self.embedding.word_embeddings.weight if self.arch.tie_word_embeddings else None
        logits, _ = self.output_layer(hidden, weight=tied)  # [rows, 1, vocab / TP]
        if self.tp_group.size() > 1:
            # Gathered here rather than with gather_output=True: Megatron's gather asks
            # torch.cuda for the current device, which a CPU (gloo) run does not have.
            parts = [torch.empty_like(logits) for _ in range(self.tp_group.size())]
            torch.distributed.all_gather(parts, logits.contiguous(), group=self.tp_group)
            logits = torch.cat(parts, dim=-1)
        return logits[:, 0, : self.arch.vocab_size]
