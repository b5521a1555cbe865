"""The asynchronous step loop gives exactly the synchronous loop's outputs (real gloo ranks).

With `scheduler.async_scheduling` the driver plans and launches step n+1 before it has read
step n's tokens back; a decode token still on the device is fed to the next step from there,
and a request that turns out to have ended (EOS, a stop string) had one more row computed
and thrown away. Here every way a request can end while a token is in flight happens: EOS
(a checkpoint that declares a token the model emits as EOS), stop strings (one inside a
token's text, one across two tokens), `max_tokens`, `min_tokens` holding EOS back, seeded
sampling, and preemption under a cache too small for the batch. The same requests run with
the loop asynchronous and synchronous, in a colocated layout, a disaggregated one and
colocated TP 2 (the sampled tokens are broadcast to the other TP rank); tokens, texts and
finish reasons must be identical. (The layout tests compare the asynchronous loop, the
default, with transformers in every layout.)
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import PROMPTS
from layout_job import generate_on_ranks
from spawn_ranks import run_ranks
from tiny_models import make_tokenizer, reference_generate

from megatron_lamina.requests.sampling_params import SamplingParams

LAYOUTS = {"colocated-tp1": (1, 0), "tp1-attn2": (1, 2), "colocated-tp2": (2, 0)}


@pytest.fixture(scope="module")
def eos_case(tiny_models, tmp_path_factory):
    """A checkpoint whose EOS is a token the greedy outputs contain, and requests that end
    every way: EOS, stop strings (inside one token's text and across two), length."""
    model = tiny_models["untied"]
    greedy = SamplingParams(max_tokens=10, temperature=0)
    tokens, _ = reference_generate(model.hf_dir, PROMPTS, [greedy] * len(PROMPTS))
    eos = tokens[0][3]
    checkpoint = tmp_path_factory.mktemp("eos") / "canonical"
    shutil.copytree(model.canonical_dir, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["architecture"]["eos_token_ids"] = [eos]
    (checkpoint / "config.json").write_text(json.dumps(config))
    words = make_tokenizer().decode(tokens[1]).split(" ")
    inside, across = words[4][1:], words[5][-1] + " " + words[6][:2]
    params = [
        SamplingParams(max_tokens=12, temperature=0),                       # EOS at its 4th token
        SamplingParams(max_tokens=12, temperature=0, stop=[inside]),        # stop inside a token
        SamplingParams(max_tokens=12, temperature=0, stop=["zz", across]),  # stop across two tokens
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0, min_tokens=6),         # EOS held back
        SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7),
        SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=8),
        SamplingParams(max_tokens=9, temperature=0, stop=[inside], ignore_eos=True),
    ]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[3], PROMPTS[2], PROMPTS[1]]
    return str(checkpoint), list(zip(prompts, params)), eos


@pytest.mark.parametrize("layout", LAYOUTS)
def test_async_loop_equals_sync_loop(layout, eos_case):
    checkpoint, requests, eos = eos_case
    tp, workers = LAYOUTS[layout]
    base = [f"parallel.tensor_parallel={tp}", f"parallel.attention_workers={workers}", "scheduler.micro_batches=2",
            "kv_cache.block_size=4", "kv_cache.num_blocks=10", "scheduler.max_prefill_tokens=8"]
    cases = [(checkpoint, base + [f"scheduler.async_scheduling={mode}"]) for mode in ("true", "false")]
    asynchronous, synchronous = run_ranks(generate_on_ranks, tp + workers, cases, requests)
    for key in ("tokens", "texts", "reasons"):
        assert asynchronous[key] == synchronous[key], key
    for got, want in zip(asynchronous["logits"], synchronous["logits"]):
        assert got.shape == want.shape and (got - want).abs().max() < 1e-5
    # Every way of ending happened, and the small cache preempted.
    assert {"stop", "length"} <= set(synchronous["reasons"])
    assert synchronous["reasons"][0] == "stop" and synchronous["tokens"][0][-1] == eos
    assert synchronous["reasons"][1] == synchronous["reasons"][2] == "stop"
    assert asynchronous["preemptions"] > 0 and synchronous["preemptions"] > 0
