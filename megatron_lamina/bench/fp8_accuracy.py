"""What FP8 costs in accuracy (issue 26): FP8 KV, FP8 weights and both, against the same
model unquantized, through the real engine (`LLM`, one rank, colocated).

Per mode: the log-probability of every token of a held-out text (`prompt_logprobs`, echo,
nothing generated), and greedy continuations of a few chats. Against the unquantized run:
the mean and 99th percentile of the absolute difference of those log-probabilities, and the
greedy agreement (the share of generated tokens before each continuation's first different
token: after it the contexts differ, so later tokens say nothing). The FP8-weight modes use a
copy of the checkpoint quantized per output channel (checkpoint/convert.quantize_checkpoint,
what `lamina convert --weight-dtype fp8_e4m3` writes). tools/fp8_accuracy.py prints the table
recorded in docs/BENCHMARKS.md; tests/test_fp8_accuracy.py bounds it on short texts.
No calibration data is used anywhere (the KV scales are 1, the weight scales come from the
weights), so any text is held out; this one was written for the purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_lamina.requests.sampling_params import SamplingParams

HELD_OUT_TEXT = (
    "The lighthouse keeper had kept the same routine for thirty years. Every evening he climbed the "
    "hundred and twelve steps, wiped the salt from the great lens, and trimmed the wick before the sun "
    "touched the water. Ships no longer needed him; their captains watched glowing screens that knew the "
    "shape of every rock. Still, the fishermen of the village said that on foggy nights they steered by "
    "his light rather than by their machines, because the light had never once been wrong. When the "
    "authorities finally wrote to say that the lamp would be replaced by an automatic beacon, he read the "
    "letter twice, folded it into his coat pocket, and went up the stairs as usual. That winter a storm "
    "cut the power along the whole coast for three days. The new beacon, still waiting on the quay in its "
    "wooden crate, stayed dark. The old lamp, fed with oil from the keeper's own store, burned every night, "
    "and every boat came home."
)

CHATS = [
    [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
    [{"role": "user", "content": "Explain how a refrigerator keeps food cold."}],
    [{"role": "user", "content": "What are the main causes of the seasons on Earth?"}],
    [{"role": "user", "content": "Give me a recipe for a simple vegetable soup."}],
]

# (label, FP8 weights, kv_cache.dtype); the first is the baseline the others are compared with.
MODES = [("unquantized", False, "auto"), ("FP8 KV", False, "fp8_e4m3"), ("FP8 weights", True, "auto"),
         ("FP8 weights + KV", True, "fp8_e4m3")]


@dataclass
class ModeRun:
    """What one mode produced."""

    prompt_logprobs: list[float]  # of the held-out text's tokens after the first
    greedy: list[list[int]]       # each chat's greedy continuation


@dataclass
class Accuracy:
    mode: str
    mean_abs: float        # mean |logprob - baseline logprob| over the held-out text's tokens
    p99_abs: float         # its 99th percentile
    agreement: float       # greedy tokens before the first difference / tokens generated
    first_divergence: list[int]  # per chat: the first different token (its length: none)


def run_mode(checkpoint: str | Path, kv_cache_dtype: str, text: str, chats, max_tokens: int, **llm) -> ModeRun:
    """One LLM for this mode: the held-out text echoed, then the chats' greedy continuations."""
    from megatron_lamina.llm import LLM

    with LLM(str(checkpoint), kv_cache_dtype=kv_cache_dtype, **llm) as model:
        [echo] = model.generate(text, SamplingParams(max_tokens=0, prompt_logprobs=0))
        greedy = model.chat(chats, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return ModeRun([t.logprob for t in echo.prompt_logprobs[1:]], [g.token_ids for g in greedy])


def compare(mode: str, base: ModeRun, run: ModeRun) -> Accuracy:
    diff = (torch.tensor(run.prompt_logprobs, dtype=torch.float64)
            - torch.tensor(base.prompt_logprobs, dtype=torch.float64)).abs()
    first = [next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
             for got, want in zip(run.greedy, base.greedy)]
    total = sum(len(want) for want in base.greedy)
    return Accuracy(mode, diff.mean().item(), torch.quantile(diff, 0.99).item(), sum(first) / total, first)


def measure(checkpoint: str | Path, fp8_checkpoint: str | Path, text: str = HELD_OUT_TEXT, chats=CHATS,
            max_tokens: int = 256, modes=MODES, **llm) -> list[Accuracy]:
    """Every mode of `modes` (the first: the baseline) on `checkpoint`, or on `fp8_checkpoint`
    for FP8 weights; `llm`: the LLM's other arguments (device, dtype, ...)."""
    runs = {label: run_mode(fp8_checkpoint if fp8 else checkpoint, kv, text, chats, max_tokens, **llm)
            for label, fp8, kv in modes}
    base = runs[modes[0][0]]
    return [compare(label, base, run) for label, run in runs.items() if run is not base]


def markdown(results: list[Accuracy], tokens: int, max_tokens: int, chats: int) -> str:
    rows = [f"| mode | prompt logprob, mean abs diff | p99 abs diff | greedy agreement ({chats} x {max_tokens} tokens) "
            "| first difference per chat |", "|---|---:|---:|---:|---|"]
    for r in results:
        first = ", ".join(str(i) if i < max_tokens else "none" for i in r.first_divergence)
        rows.append(f"| {r.mode} | {r.mean_abs:.4f} | {r.p99_abs:.4f} | {100 * r.agreement:.1f}% | {first} |")
    rows.append(f"\n({tokens} held-out tokens scored.)")
    return "\n".join(rows)

