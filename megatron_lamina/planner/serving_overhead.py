"""Host time a real server spends per step beyond the profiled forward pass, measured and fitted.

A cost table (tools/profile_costs.py) times `ModelWorker.run` and the sampler; the serving driver
also schedules, broadcasts the plan, copies the inputs, reads the tokens back, detokenizes and
streams (with asynchronous scheduling much of it while the GPU runs the next step).
`ServingOverhead` is

    extra step time = per_step + per_row * sampled rows + per_token * sum(output length after the step)

(per_step may come out negative: see `fit`; a step still costs at least the model worker's
layers, `ServingStepCostModel`). With `decode_steps_only` the per_step term is
paid by pure-decode steps alone: a server with CUDA graphs replays those as one whole-step graph
(worker/cuda_graphs.py), which launches faster than the stage-by-stage graphs and eager
attention the profile times, while a step that carries a prefill chunk runs exactly those
stage graphs, so the profile already is its cost. The per_token term was the engine's old
detokenization, which decoded each request's whole output every token; the incremental
detokenizer costs a constant per token (`measure_detokenization` times it), part of
per_row, and validation fixes per_token at 0. `fit` estimates the rest from calibration runs
against the real server (closed batches of B requests, pure-decode steps), as residuals
`measured step - StepCostModel's step`:
`decode_step_samples` turns one such run's bench_serving records into (rows, decoded
tokens, residual) samples. `ServingStepCostModel` adds the term to the simulator's step time;
`serving_simulator` builds an `EngineSimulator` that uses it. tools/validate_planner.py
reports predictions with and without it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from megatron_lamina.planner.cost_table import CostTable
from megatron_lamina.planner.layout import Layout
from megatron_lamina.planner.shapes import ModelShape
from megatron_lamina.planner.simulator import ChunkWork, EngineSimulator, StepCostModel


@dataclass
class ServingOverhead:
    per_step_s: float
    per_row_s: float
    per_token_s: float    # per output token decoded (each sampled row decodes its whole output)
    source: str = ""
    decode_steps_only: bool = False   # per_step_s on pure-decode steps only (see the module's text)

    def time(self, rows: int, decoded_tokens: int, prefill: bool = False) -> float:
        """`prefill`: the step carries a prefill chunk."""
        per_step = 0.0 if prefill and self.decode_steps_only else self.per_step_s
        return per_step + self.per_row_s * rows + self.per_token_s * decoded_tokens

    def to_dict(self) -> dict:
        return {"per_step_s": self.per_step_s, "per_row_s": self.per_row_s, "per_token_s": self.per_token_s,
                "decode_steps_only": self.decode_steps_only, "source": self.source}


@dataclass
class ServingStepCostModel(StepCostModel):
    overhead: ServingOverhead | None = None

    def step_time(self, micro_batches: list[list[ChunkWork]], sampled_rows: int, decoded_tokens: int = 0) -> float:
        """The profiled step plus the overhead; at least the model worker's own layers. A negative
        per-step term (the profile's pieces overlapping in a real step) can hide host work,
        attention and the exchange, never the model's GEMMs, which run one after another on its
        device: without that floor, a fit from a noisy calibration (a large negative constant)
        predicted small steps of no time or less."""
        prefill = any(tokens > 1 for chunks in micro_batches for _, _, tokens in chunks)
        costs = self.micro_batch_costs(micro_batches)
        step = self.pipelined_time(costs, sampled_rows) + self.overhead.time(sampled_rows, decoded_tokens, prefill)
        return max(step, self.shape.num_layers * sum(mb.model_s for mb in costs))


def serving_simulator(layout: Layout, shape: ModelShape, costs: CostTable, num_blocks: int,
                      overhead: ServingOverhead | None, max_model_len: int | None = None) -> EngineSimulator:
    """A colocated or disaggregated `EngineSimulator` whose steps also pay `overhead` (None: not)."""
    layout.check(shape)
    step_costs = (StepCostModel(layout, shape, costs, costs) if overhead is None
                  else ServingStepCostModel(layout, shape, costs, costs, overhead=overhead))
    return EngineSimulator(step_costs, num_blocks, max_model_len)


def decode_step_samples(records: list[dict], prompt_len: int, costs: StepCostModel) -> list[tuple[int, int, float]]:
    """(rows, decoded tokens, measured - modelled seconds) per output position of a closed batch.

    `records`: bench_serving records of B requests sent together, each with `prompt_len`
    prompt tokens. Only the steps where all B requests were decoding count: token gaps after
    the last request's first token and before the first request's last token. The gap before
    output token k (0-based) is a step whose rows each decode their k-th token with k + 1
    output tokens to detokenize; its median over the requests is compared with the model."""
    done = [r for r in records if r["ok"] and len(r["token_times_s"]) > 2]
    if not done:
        return []
    start = max(r["token_times_s"][0] for r in done)
    end = min(r["token_times_s"][-1] for r in done)
    batch = len(records)
    gaps: dict[int, list[float]] = {}
    for r in done:
        times = r["token_times_s"]
        for k in range(1, len(times)):
            if times[k - 1] >= start and times[k] <= end:
                gaps.setdefault(k, []).append(times[k] - times[k - 1])
    samples = []
    for k, values in sorted(gaps.items()):
        if len(values) < max(1, batch // 2):
            continue
        # B decode rows on shard 0, each feeding its (k-1)-th output token: context prompt + k
        modelled = StepCostModel.step_time(costs, [[(0, prompt_len + k, 1)] * batch], batch)
        samples.append((batch, batch * (k + 1), statistics.median(values) - modelled))
    return samples


def measure_detokenization(checkpoint_dir, tokens: int = 2048, repeats: int = 5) -> float:
    """Seconds per token of the engine's incremental detokenizer (`IncrementalDetokenizer.push`,
    once per sampled row and step) on the checkpoint's tokenizer, random ids of its vocabulary:
    a constant per token, whatever the output length."""
    import random
    import time

    from megatron_lamina.requests.tokenizer import TextCodec

    codec = TextCodec(checkpoint_dir)
    rng, vocab = random.Random(0), len(codec.tokenizer)
    ids = [rng.randrange(vocab) for _ in range(tokens)]
    times = []
    for _ in range(repeats):
        detokenizer = codec.incremental()
        start = time.perf_counter()
        for token in ids:
            detokenizer.push(token)
        times.append((time.perf_counter() - start) / tokens)
    return statistics.median(times)


def fit(samples: list[tuple[int, int, float]], source: str = "", per_token_s: float | None = None,
        decode_steps_only: bool = False) -> ServingOverhead:
    """Least squares of residual = a + b * rows + c * decoded tokens over the samples, with
    b, c >= 0 (host work per row and per token is never negative) and `a` free: a negative
    constant is the profile's separately timed pieces (model, attention, overhead, each
    synchronized) overlapping in a real step. Exact: every subset of {b, c} is tried.
    `per_token_s` (measured, e.g. by `measure_detokenization`) fixes c instead of fitting it."""
    import itertools

    import torch

    if not samples:
        raise ValueError("no calibration samples: did the calibration requests complete?")
    fixed = per_token_s or 0.0
    x = torch.tensor([[1.0, rows, tokens] for rows, tokens, _ in samples], dtype=torch.float64)
    y = torch.tensor([[residual - fixed * tokens] for _, tokens, residual in samples], dtype=torch.float64)
    best, best_error = None, float("inf")
    free = (1,) if per_token_s is not None else (1, 2)
    for size in range(len(free) + 1):
        for terms in itertools.combinations(free, size):
            columns = (0, *terms)
            solution = torch.linalg.lstsq(x[:, columns], y, driver="gelsd").solution[:, 0]
            if bool((solution[1:] < 0).any()):
                continue
            error = float((x[:, columns] @ solution - y[:, 0]).square().sum())
            if error < best_error:
                best, best_error = [0.0, 0.0, fixed], error
                for column, value in zip(columns, solution.tolist()):
                    best[column] = value
    return ServingOverhead(*best, source, decode_steps_only)
