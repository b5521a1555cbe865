"""Stop rules on the real engine (colocated, one rank): stop strings, EOS, max_tokens.

The tiny model's greedy continuation is known from `transformers`; a stop string equal to
the text of one of its tokens must cut the text just before it, and a checkpoint that
declares that token as EOS must end the request right after producing it.
"""

from __future__ import annotations

import json
import shutil

from spawn_ranks import run_ranks
from tiny_models import make_tokenizer, reference_generate

from megatron_lamina.requests.sampling_params import SamplingParams

PROMPT = [1, 5, 9, 14, 3]


def _generate(checkpoint, params_list):
    from megatron_lamina.config import load_config
    from megatron_lamina.driver.llm_engine import LLMEngine
    from megatron_lamina.requests.prompt import PromptInput
    from megatron_lamina.worker.runtime import start_rank

    ctx = start_rank(load_config(None, [f"model.checkpoint={checkpoint}", "parallel.attention_workers=0",
                                        "kv_cache.num_blocks=16"]))
    engine = LLMEngine(ctx)
    done = engine.generate([PromptInput(prompt_token_ids=PROMPT, params=p) for p in params_list])
    engine.shutdown()
    return [(r.output_token_ids, r.text, r.finish_reason) for r in done]


def test_stop_string_eos_and_length(tmp_path, tiny_models):
    model = tiny_models["untied"]
    tokens, _ = reference_generate(model.hf_dir, [PROMPT], [SamplingParams(max_tokens=8, temperature=0)])
    tokens = tokens[0]
    tok = make_tokenizer()
    # The first generated token (after the first) whose text first occurs at its own place.
    i = next(i for i in range(1, 8)
             if tok.decode(tokens[:i + 1]).find(tok.decode([tokens[i]])) == len(tok.decode(tokens[:i])) + 1)
    word = tok.decode([tokens[i]])

    eos_checkpoint = tmp_path / "eos"
    shutil.copytree(model.canonical_dir, eos_checkpoint)
    config = json.loads((eos_checkpoint / "config.json").read_text())
    config["architecture"]["eos_token_ids"] = [tokens[i]]
    (eos_checkpoint / "config.json").write_text(json.dumps(config))

    greedy = dict(temperature=0, max_tokens=8)
    stop, length = run_ranks(_generate, 1, str(model.canonical_dir),
                             [SamplingParams(stop=[word], **greedy), SamplingParams(**greedy)])
    assert stop == (tokens[:i + 1], tok.decode(tokens[:i]) + " ", "stop")
    assert length == (tokens, tok.decode(tokens), "length")

    eos, ignored = run_ranks(_generate, 1, str(eos_checkpoint),
                             [SamplingParams(**greedy), SamplingParams(ignore_eos=True, **greedy)])
    assert eos == (tokens[:i + 1], tok.decode(tokens[:i + 1]), "stop")
    assert ignored[0] == tokens and ignored[2] == "length"
