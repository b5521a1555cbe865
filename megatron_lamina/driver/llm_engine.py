"""The driver's engine: requests in, tokens out, one step at a time (rank 0 only).

`LLMEngine.step()` asks the scheduler for a plan, broadcasts it to every rank, launches the
model-worker side of it and samples one token for every chunk that ends a sequence (one
batched sampler call on the logits' device, with the requests' generators on that device),
all without waiting for the GPU. With `scheduler.async_scheduling` (the default) it then
reads back the *previous* step's tokens (one pinned copy, waited on by its event, while the
GPU runs the step just launched) and applies them: the stop rules (EOS, stop strings,
`max_tokens`, the model's context) and the text, decoded incrementally. So the host plans,
launches and detokenizes step n+1 while the GPU computes step n; a request's decode token
that is not read back yet is fed to the next step on the device (scheduler.py,
step_inputs.py). Without it, each step is read back right after its launch: the same tokens,
with the GPU idle while the host works. `generate` is the offline loop over `step` for a
list of prompts. `shutdown` releases the other ranks.

Whatever one request's own work raises (tokenizing it, its logits callback, appending its
token, detokenizing, its stop rules) ends that request alone, with `finish_reason` "error"
and `Request.error` saying why (the traceback goes to stderr); the other requests go on. Only
what is the step's as a whole (the plan's broadcast, the model, the sampler, the read-back
copy) escapes `step`: a rank or the device failed, and the caller ends the job. From the
end of start-up on, the driver's heartbeat keeps every other rank's wait for a plan alive
(control_plane.py); the engine's `PlanSender` sends the plans and raises what the heartbeat found.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from megatron_lamina.driver.block_manager import BlockManager
from megatron_lamina.worker.control_plane import PlanSender
from megatron_lamina.requests.engine_link import StepStats
from megatron_lamina.driver.logprobs import StepLogprobs, token_logprobs
from megatron_lamina.requests.prompt import PromptInput, prompt_ids
from megatron_lamina.driver.request import Request
from megatron_lamina.worker.runtime import RankContext
from megatron_lamina.driver.sampling import sample_tokens_on_device
from megatron_lamina.requests.sampling_params import SamplingParams
from megatron_lamina.driver.scheduler import Scheduler, reaches_length
from megatron_lamina.driver.token_mask import masked_logits
from megatron_lamina.requests.tokenizer import TextCodec, find_stop
from megatron_lamina.plan import StepPlan

if TYPE_CHECKING:  # xgrammar is imported by the first constrained request, not by every start
    from megatron_lamina.requests.grammar import GrammarCompiler


@dataclass
class _InFlight:
    """A launched step whose tokens are not read back yet."""

    requests: list[Request]
    host_tokens: torch.Tensor
    done: torch.cuda.Event | None
    stats: StepStats
    launched: float
    events: tuple | None = None         # (start, end) CUDA timing events
    logits: torch.Tensor | None = None  # kept only for `on_logits`
    logprobs: "StepLogprobs | None" = None


class LLMEngine:
    def __init__(self, ctx: RankContext):
        assert ctx.rank == 0, "the engine runs on the driver rank"
        self.ctx = ctx
        self.control = PlanSender(ctx.groups, ctx.liveness)
        self.codec = TextCodec(ctx.cfg.model.checkpoint)
        self.eos_token_ids = set(ctx.arch.eos_token_ids)
        kv = ctx.cfg.kv_cache
        blocks = BlockManager(ctx.topology.request_shards, ctx.num_blocks, kv.block_size, kv.prefix_caching,
                              ctx.num_host_blocks)
        s = ctx.cfg.scheduler
        self.scheduler = Scheduler(blocks, s.max_batch_size, s.max_prefill_tokens, ctx.cfg.micro_batches,
                                   ctx.arch.max_position_embeddings)
        self.async_scheduling = s.async_scheduling
        self.worker = ctx.worker
        self.cuda = ctx.device.type == "cuda"
        self._ids = itertools.count()
        self._inflight: _InFlight | None = None
        self._previous_end: torch.cuda.Event | None = None  # the last step's end, while steps run back to back
        self.stats: deque[StepStats] = deque(maxlen=4096)  # steps read back, not yet taken by a listener
        self.on_logits: Callable[[Request, torch.Tensor], None] | None = None  # tests, debugging
        self._grammars: GrammarCompiler | None = None  # made at the first constrained request
        self.compiling: list[Request] = []  # admitted, waiting for their grammar's compile (off this thread)

    def make_request(self, item: PromptInput) -> Request:
        """The request of one prompt. ValueError: the input is at fault (an empty prompt, an id
        outside the vocabulary, messages the chat template refuses); any other exception is a
        fault of ours with this one input, and its caller ends this request alone."""
        ids = prompt_ids(self.codec, item, self.ctx.arch.vocab_size)
        params = item.params or SamplingParams()
        return Request(next(self._ids), ids, params, user_id=item.user_id,
                       generator=params.make_generator(self.ctx.device), detokenizer=self.codec.incremental(),
                       cache_salt=item.cache_salt)

    def add_request(self, item: PromptInput) -> Request:
        request = self.make_request(item)
        self.admit(request)
        return request

    @property
    def grammars(self) -> GrammarCompiler:
        if self._grammars is None:
            from megatron_lamina.requests.grammar import GrammarCompiler

            server, arch = self.ctx.cfg.server, self.ctx.arch
            self._grammars = GrammarCompiler(self.codec.tokenizer, arch.vocab_size, arch.eos_token_ids,
                                             server.grammar_cache_size, server.max_grammar_chars)
        return self._grammars

    def admit(self, request: Request) -> None:
        """Queue a request `make_request` made (ValueError: it can never fit). One with
        structured outputs starts its grammar's compile (cached: done at once for a schema seen
        before) and waits outside the scheduler until it is compiled, so it stalls no step."""
        self.scheduler.check_fits(request)
        spec = request.params.structured_outputs
        if spec is None:
            self.scheduler.add(request)
            return
        request.grammar = self.grammars.compile(spec)
        self.compiling.append(request)

    def _admit_compiled(self) -> list[Request]:
        """Move the requests whose grammar compiled into the scheduler; return those whose
        compile failed (they end with the error). With nothing else to do, wait a moment for one."""
        ready = [r for r in self.compiling if r.finished or r.grammar.done()]
        if not ready and not self.scheduler.has_work() and self._inflight is None:
            concurrent.futures.wait([r.grammar for r in self.compiling], timeout=0.01,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
            ready = [r for r in self.compiling if r.finished or r.grammar.done()]
        failed = []
        for request in ready:
            self.compiling.remove(request)
            if request.finished:  # aborted while it compiled
                continue
            error = request.grammar.exception()
            if error is not None:
                request.error = str(error)
                self.scheduler.finish(request, "error")
                failed.append(request)
            else:
                request.grammar = self.grammars.state(request.grammar.result())
                self.scheduler.add(request)
        return failed

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None or bool(self.compiling)

    def step(self) -> list[Request]:
        """Launch a step and read back the previous one; return the requests that got a
        token (or ended) in what was read back."""
        updated = self._admit_compiled() if self.compiling else []
        if self._inflight is not None and any(r.params.needs_history for r in self.scheduler.running):
            # A penalty depends on every token before: this step is planned synchronously.
            updated += self._read_back(self._inflight)
            self._inflight = None
        plan = self.scheduler.schedule()
        updated += self.scheduler.take_ended()
        launched = self._launch(plan, updated) if plan.micro_batches else None
        if self._inflight is not None:
            updated += self._read_back(self._inflight)
        self._inflight = launched
        if launched is not None and not self.async_scheduling:
            updated += self._read_back(launched)
            self._inflight = None
        return updated

    def went_idle(self) -> None:
        """The caller found no work and waited: the next step does not follow this one."""
        self._previous_end = None

    def _launch(self, plan: StepPlan, updated: list[Request]) -> _InFlight:
        launched = time.monotonic()
        self.control.send(plan)
        start = end = None
        if self.cuda:  # right before the step's first GPU work: a late host shows as a gap before it
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        logits = self.worker.run(plan)
        sampled_rows, whole = plan.logit_layout()
        sampled = logits if len(sampled_rows) == logits.shape[0] else logits.index_select(
            0, torch.tensor(sampled_rows, dtype=torch.long).to(logits.device, non_blocking=True))
        by_id = {r.request_id: r for r in self.scheduler.running}
        requests = [by_id[c.request_id] for c in plan.sampled_chunks]
        params = [r.params for r in requests]
        constrained = [row for row, r in enumerate(requests) if r.grammar is not None]
        if constrained:
            if self._inflight is not None:  # the masks need its tokens: read back while the device runs this model
                updated += self._read_back(self._inflight)
                self._inflight = None
            sampled = self._masked(sampled, requests, constrained)
        history = None  # the penalized rows' (prompt, output) tokens, where there are any
        if any(p.needs_history for p in params):
            history = [(r.prompt_token_ids, r.output_token_ids) if r.params.needs_history else None for r in requests]
        tokens = sample_tokens_on_device(sampled, params, [r.generator for r in requests], history)
        self.worker.feed.publish(tokens)
        for row, request in enumerate(requests):
            request.num_pending += 1
            request.feed_row = row
        logprobs = token_logprobs(sampled, tokens, params, logits, [(by_id[c.request_id], c, row) for c, row in whole])
        done = None
        if self.cuda:  # one pinned copy of the B token ids (and any log-probabilities), waited on by its event
            host = torch.empty(len(requests), dtype=torch.long, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            logprobs = logprobs.to_host() if logprobs else None
            end.record()
            done = end
        else:
            host = tokens
        stats = StepStats(len(requests), sum(mb.num_rows for mb in plan.micro_batches), 0.0)
        kept = sampled.clone() if self.on_logits is not None else None  # graphs reuse their logits buffer
        return _InFlight(requests, host, done, stats, launched, (start, end) if self.cuda else None, kept, logprobs)

    def _masked(self, sampled: torch.Tensor, requests: list[Request], rows: list[int]) -> torch.Tensor:
        """The step's sampled logits with each constrained row's grammar mask: filled on the
        host, applied on the device (the sampler and the log-probabilities see the same rows)."""
        rows = [row for row in rows if not requests[row].finished]  # ended at the read-back just done
        if not rows:
            return sampled
        from megatron_lamina.requests.grammar import fill_bitmask

        bitmask = self.grammars.new_bitmask(len(rows))
        fill_bitmask(self.grammars, [requests[row].grammar for row in rows], bitmask)
        return masked_logits(sampled, rows, bitmask)

    def _read_back(self, step: _InFlight) -> list[Request]:
        if step.done is not None:
            step.done.synchronize()
        tokens = step.host_tokens.tolist()
        step.stats.wall_s = time.monotonic() - step.launched
        if step.events is not None:
            start, end = step.events
            step.stats.gpu_s = start.elapsed_time(end) / 1e3
            if self._previous_end is not None:
                step.stats.gpu_period_s = self._previous_end.elapsed_time(end) / 1e3
            self._previous_end = end
        self.stats.append(step.stats)
        generated = step.logprobs.attach_prompts() if step.logprobs else {}
        updated = []
        for row, (request, token) in enumerate(zip(step.requests, tokens)):
            request.num_pending -= 1
            if request.finished:  # it ended (EOS, stop string, abort) while this token was in flight
                continue
            try:
                if self.on_logits is not None:
                    self.on_logits(request, step.logits[row])
                if row in generated:
                    request.output_logprobs.append(generated[row])
                self._append_token(request, token)
            except Exception as e:  # noqa: BLE001 - this request's fault ends this request only
                self.fail_request(request, e)
            updated.append(request)
        return updated

    def fail_request(self, request: Request, error: Exception) -> None:
        """End one request with an error its caller receives; the traceback goes to the log."""
        print(f"error: request {request.user_id!r} failed; the others go on:", file=sys.stderr)
        traceback.print_exception(error, file=sys.stderr)
        request.error = f"internal error while processing this request ({type(error).__name__}: {error})"
        if not request.finished:
            self.scheduler.finish(request, "error")

    def _append_token(self, request: Request, token: int) -> None:
        params = request.params
        if params.max_tokens == 0:  # a prompt scored, nothing generated (echo with max_tokens 0)
            request.output_logprobs.clear()
            self.scheduler.finish(request, "length")
            return
        request.output_token_ids.append(token)
        if request.grammar is not None and not request.grammar.accept(token):
            raise RuntimeError(f"the sampler drew token {token}, which the request's grammar does not allow")
        text = request.text + request.detokenizer.push(token)
        produced = len(request.output_token_ids)
        reason = None
        if params.stop and produced > params.min_tokens:
            cut = find_stop(text, params.stop, since=request.stop_searched)
            request.stop_searched = len(text)
            if cut is not None:
                text, reason = text[:cut], "stop"
        if reason is None and request.grammar is not None and request.grammar.terminated:
            reason = "stop"  # the grammar is complete and took its stop token (EOS): nothing may follow
        if reason is None:
            if (token in self.eos_token_ids and not params.ignore_eos
                    or token in params.stop_token_ids) and produced > params.min_tokens:
                reason = "stop"
            elif reaches_length(produced, request.num_tokens, params.max_tokens, self.scheduler.max_model_len):
                reason = "length"
            if reason is not None:
                text += request.detokenizer.flush()  # the bytes of a character the output ends inside
        request.text = text
        if reason is not None:
            self.scheduler.finish(request, reason)

    def generate(self, items: list[PromptInput]) -> list[Request]:
        requests = [self.add_request(item) for item in items]
        while self.has_work():
            self.step()
        return requests

    def shutdown(self) -> None:
        """Release the other ranks (they leave their loop): the shutdown plan, then the heartbeat's goodbye."""
        self.control.close(StepPlan(shutdown=True))

    def abandon(self) -> None:
        """No plan follows (a rank failed): stop the heartbeats, tell nobody."""
        self.control.close()
