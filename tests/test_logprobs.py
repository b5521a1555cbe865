"""Log-probabilities from the engine against transformers, and the sampler's penalties and
min_p against their definitions, on real gloo ranks (tiny model, float32).

Generated tokens' log-probabilities (`SamplingParams.logprobs`) and the prompt's
(`prompt_logprobs`, what echo reports; chunked prefill, a small cache that preempts) must
equal log_softmax of transformers' logits of the same sequence (raw logits: before
temperature), the top-k alternatives included; `max_tokens: 0` scores a prompt without
generating. In the synchronous and the asynchronous loop, colocated and disaggregated.
"""

from __future__ import annotations

import pytest
import torch
from spawn_ranks import run_ranks

from megatron_lamina.requests.sampling_params import SamplingParams

PROMPT = [1, 5, 9, 14, 3, 40, 41, 42, 43, 44, 45]


def _run(checkpoint, overrides, requests):
    from megatron_lamina.config import load_config
    from megatron_lamina.worker.control_plane import serve_plans
    from megatron_lamina.driver.llm_engine import LLMEngine
    from megatron_lamina.requests.prompt import PromptInput
    from megatron_lamina.worker.runtime import start_rank

    ctx = start_rank(load_config(None, [f"model.checkpoint={checkpoint}", *overrides]))
    if ctx.rank != 0:
        serve_plans(ctx)
        return None
    engine = LLMEngine(ctx)
    done = engine.generate([PromptInput(prompt_token_ids=p, params=params) for p, params in requests])
    engine.shutdown()

    def plain(entries):
        return [None if e is None else (e.logprob, e.top) for e in entries]
    return [(r.output_token_ids, plain(r.output_logprobs), plain(r.prompt_logprobs), r.finish_reason) for r in done]


def _reference(hf_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def _check(entry, row, token, k):
    logprob, top = entry
    assert abs(logprob - row[token].item()) < 1e-4, (logprob, row[token].item())
    want = row.topk(k)
    assert [t for t, _ in top] == want.indices.tolist()
    assert all(abs(v - w) < 1e-4 for (_, v), w in zip(top, want.values.tolist()))


@pytest.mark.parametrize("layout", [["parallel.attention_workers=0"],
                                    ["parallel.attention_workers=2", "scheduler.async_scheduling=false"]])
def test_logprobs_match_transformers(tiny_models, layout):
    model = tiny_models["untied"]
    overrides = layout + ["kv_cache.block_size=4", "kv_cache.num_blocks=32", "scheduler.max_prefill_tokens=4"]
    requests = [(PROMPT, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2)),
                (PROMPT[:4], SamplingParams(max_tokens=0, prompt_logprobs=0)),
                (PROMPT[:1], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=1)),
                (PROMPT[2:], SamplingParams(max_tokens=4, temperature=0.8, seed=3, ignore_eos=True, logprobs=0))]
    world = 1 if "parallel.attention_workers=0" in layout else 3
    results = run_ranks(_run, world, str(model.canonical_dir), overrides, requests)
    for (prompt, params), (tokens, logprobs, prompt_logprobs, reason) in zip(requests, results):
        ref = _reference(model.hf_dir, prompt + tokens)
        assert len(tokens) == params.max_tokens and reason == "length"
        if params.logprobs is not None:
            assert len(logprobs) == len(tokens)
            for i, (entry, token) in enumerate(zip(logprobs, tokens)):
                _check(entry, ref[len(prompt) - 1 + i], token, params.logprobs)
        else:
            assert logprobs == []
        if params.prompt_logprobs is not None:
            assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
            for position in range(1, len(prompt)):
                _check(prompt_logprobs[position], ref[position - 1], prompt[position], params.prompt_logprobs)
        else:
            assert prompt_logprobs == []
