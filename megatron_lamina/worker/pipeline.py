"""The model worker's side of the staggered pipeline (DESIGN.md section 4), for any executor.

`run_pipeline` walks `exchange_order` (rotation.py): it runs each micro-batch's first stage
and posts its layer-0 attention, then, for every exchange in order, collects the attention
output and runs the next stage, posting the next layer's attention, until the last stage
gives the logits. While one micro-batch's attention is away the others' stages run. The
stages come from a `Stages` object: `EagerStages` runs the model's stage functions
(model/llama.py) as they are; `stage_graphs.GraphStages` replays CUDA graphs of the same
functions; the colocated whole-step graph (cuda_graphs.py) captures this very loop.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from megatron_lamina.worker.rotation import exchange_order
from megatron_lamina.worker.step_inputs import MicroBatchInputs
from megatron_lamina.model.llama import LlamaModel
from megatron_lamina.transport.channel import AttentionChannel

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Stages(Protocol):
    def first(self, j: int, inputs: MicroBatchInputs) -> QKV: ...

    def middle(self, j: int, layer: int, attention_out: torch.Tensor) -> QKV: ...

    def last(self, j: int, attention_out: torch.Tensor) -> torch.Tensor: ...


class EagerStages:
    """The model's stage functions, run as they are; one residual stream per micro-batch."""

    def __init__(self, model: LlamaModel):
        self.model = model
        self.state: dict[int, tuple] = {}

    def first(self, j: int, inputs: MicroBatchInputs) -> QKV:
        residual, cos, sin, q, k, v = self.model.first_stage(inputs.token_ids, inputs.positions)
        self.state[j] = (residual, cos, sin, inputs.sample_rows)
        return q, k, v

    def middle(self, j: int, layer: int, attention_out: torch.Tensor) -> QKV:
        residual, cos, sin, rows = self.state[j]
        residual, q, k, v = self.model.middle_stage(layer, residual, attention_out, cos, sin)
        self.state[j] = (residual, cos, sin, rows)
        return q, k, v

    def last(self, j: int, attention_out: torch.Tensor) -> torch.Tensor:
        residual, _, _, rows = self.state.pop(j)
        hidden = self.model.last_stage(residual, attention_out)
        return self.model.head(hidden if rows is None else hidden[rows])


def run_pipeline(stages: Stages, channel: AttentionChannel, inputs: list[MicroBatchInputs],
                 contexts: list[Any], num_layers: int) -> list[torch.Tensor]:
    """Logits of each micro-batch's sampled rows."""
    pending = [channel.begin(0, contexts[j], *stages.first(j, inputs[j])) for j in range(len(inputs))]
    logits: list[torch.Tensor | None] = [None] * len(inputs)
    for layer, j in exchange_order(len(inputs), num_layers):
        attention_out = channel.finish(pending[j])
        if layer + 1 < num_layers:
            pending[j] = channel.begin(layer + 1, contexts[j], *stages.middle(j, layer + 1, attention_out))
        else:
            logits[j] = stages.last(j, attention_out)
    return logits
