"""The driver's engine: requests in, tokens out, one step at a time (rank 0 only).

`LLMEngine.step()` asks the scheduler for a plan, broadcasts it to every rank, runs the
model-worker side of it, samples one token for every chunk that ends a sequence (one batched
`sample_tokens` call on the logits' device, with the requests' generators on that device), and applies
the stop rules (EOS, stop strings, `max_tokens`, the model's context). `generate` is the
offline loop over `step` for a list of prompts. `shutdown` releases the other ranks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch

from megatron_lamina.engine.block_manager import BlockManager
from megatron_lamina.engine.request import Request
from megatron_lamina.engine.runtime import RankContext, broadcast_plan
from megatron_lamina.engine.sampling import SamplingParams, sample_tokens
from megatron_lamina.engine.scheduler import Scheduler
from megatron_lamina.engine.tokenizer import TextCodec, find_stop
from megatron_lamina.plan import StepPlan


@dataclass
class PromptInput:
    """One generation: a plain prompt, chat messages, or token ids (exactly one of them)."""

    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_token_ids: list[int] | None = None
    params: SamplingParams | None = None
    user_id: object = None


class LLMEngine:
    def __init__(self, ctx: RankContext):
        assert ctx.rank == 0, "the engine runs on the driver rank"
        self.ctx = ctx
        self.codec = TextCodec(ctx.cfg.model.checkpoint)
        self.eos_token_ids = set(ctx.arch.eos_token_ids)
        blocks = BlockManager(ctx.topology.request_shards, ctx.num_blocks, ctx.cfg.kv_cache.block_size)
        s = ctx.cfg.scheduler
        self.scheduler = Scheduler(blocks, s.max_batch_size, s.max_prefill_tokens, s.micro_batches,
                                   ctx.arch.max_position_embeddings)
        self._ids = itertools.count()
        self.on_logits: Callable[[Request, torch.Tensor], None] | None = None  # tests, debugging

    def make_request(self, item: PromptInput) -> Request:
        if item.prompt_token_ids is not None:
            ids = list(item.prompt_token_ids)
        elif item.messages is not None:
            ids = self.codec.encode_chat(item.messages)
        else:
            ids = self.codec.encode_prompt(item.prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.ctx.arch.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        params = item.params or SamplingParams()
        return Request(next(self._ids), ids, params, user_id=item.user_id,
                       generator=params.make_generator(self.ctx.device))

    def add_request(self, item: PromptInput) -> Request:
        request = self.make_request(item)
        self.scheduler.add(request)
        return request

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Request]:
        """Run one step; return the requests that got a token in it."""
        plan = self.scheduler.schedule()
        ended, self.scheduler.ended = self.scheduler.ended, []
        if not plan.micro_batches:
            return ended
        broadcast_plan(plan, self.ctx.groups)
        logits = self.ctx.runner.run(plan)
        by_id = {r.request_id: r for r in self.scheduler.running}
        for chunk in (c for mb in plan.micro_batches for c in mb.chunks):
            by_id[chunk.request_id].num_computed = chunk.end
        updated = ended
        sampled = [by_id[chunk.request_id] for chunk in plan.sampled_chunks][:len(logits)]
        logits = logits[:len(sampled)]
        if self.on_logits is not None:
            for request, row in zip(sampled, logits):
                self.on_logits(request, row)
        tokens = sample_tokens(logits, [r.params for r in sampled], [r.generator for r in sampled])
        for request, token in zip(sampled, tokens):
            self._append_token(request, token)
            updated.append(request)
        return updated

    def _append_token(self, request: Request, token: int) -> None:
        request.output_token_ids.append(token)
        params = request.params
        text = self.codec.decode(request.output_token_ids)
        reason = None
        cut = find_stop(text, params.stop) if len(request.output_token_ids) > params.min_tokens else None
        if cut is not None:
            text, reason = text[:cut], "stop"
        elif (token in self.eos_token_ids and not params.ignore_eos
              and len(request.output_token_ids) > params.min_tokens):
            reason = "stop"
        elif len(request.output_token_ids) >= params.max_tokens:
            reason = "length"
        elif request.num_tokens >= self.ctx.arch.max_position_embeddings:
            reason = "length"
        request.text = text
        if reason is not None:
            self.scheduler.finish(request, reason)

    def generate(self, items: list[PromptInput]) -> list[Request]:
        requests = [self.add_request(item) for item in items]
        while self.has_work():
            self.step()
        return requests

    def heartbeat(self) -> None:
        """An empty plan: every rank's collective completes, proving they are alive."""
        broadcast_plan(StepPlan(), self.ctx.groups)

    def shutdown(self) -> None:
        broadcast_plan(StepPlan(shutdown=True), self.ctx.groups)
