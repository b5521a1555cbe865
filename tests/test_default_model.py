"""The default model end to end: SmolLM2-135M-Instruct (GGUF) in the default layout (one model
worker, two attention workers split by requests, real gloo ranks) answers chat prompts with
exactly the greedy tokens of `transformers` loading the same GGUF file."""

from __future__ import annotations

import pytest
import torch
from spawn_ranks import run_ranks

from megatron_lamina.requests.sampling_params import SamplingParams

pytestmark = pytest.mark.xdist_group("smollm2")  # the `smollm2` session fixture: built once, on one worker (conftest)

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three colours."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is 2+2?"}],
]
MAX_TOKENS = 20


def _chat_on_ranks(checkpoint):
    from megatron_lamina.config import load_config
    from megatron_lamina.worker.control_plane import serve_plans
    from megatron_lamina.driver.llm_engine import LLMEngine
    from megatron_lamina.requests.prompt import PromptInput
    from megatron_lamina.worker.runtime import start_rank

    ctx = start_rank(load_config("configs/default.yaml", [f"model.checkpoint={checkpoint}"]))
    if ctx.rank != 0:
        serve_plans(ctx)
        return None
    engine = LLMEngine(ctx)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    done = engine.generate([PromptInput(messages=m, params=params) for m in CHATS])
    engine.shutdown()
    return [(r.prompt_token_ids, r.output_token_ids, r.text, r.finish_reason) for r in done]


def test_default_model_matches_transformers(smollm2):
    hf_model, checkpoint = smollm2
    from transformers import AutoTokenizer

    from megatron_lamina.checkpoint.default_model import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    hf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    results = run_ranks(_chat_on_ranks, 3, str(checkpoint), timeout=600)
    assert len(results) == len(CHATS)
    for chat, (prompt_ids, tokens, text, reason) in zip(CHATS, results):
        expected_prompt = hf_tok(hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                                 add_special_tokens=False)["input_ids"]
        assert list(prompt_ids) == expected_prompt  # the engine keeps prompts as tuples
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
        expected = out[0, len(prompt_ids):].tolist()
        assert tokens == expected
        assert text == hf_tok.decode(expected, skip_special_tokens=True)
        assert reason == ("stop" if expected[-1] == 2 else "length")
