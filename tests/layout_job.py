"""What each rank runs in the layout tests: the real launcher path, minus argument parsing.

`generate_on_ranks` starts the rank with `start_rank` for every (checkpoint, overrides)
case in turn; the driver generates from token-id prompts (greedy and seeded) and records every
step's logits, the other ranks serve plans until the driver shuts them down.
"""

from __future__ import annotations

import torch


def generate_on_ranks(cases, inputs):
    from megatron_lamina.config import load_config
    from megatron_lamina.worker.control_plane import serve_plans
    from megatron_lamina.driver.llm_engine import LLMEngine
    from megatron_lamina.requests.prompt import PromptInput
    from megatron_lamina.worker.runtime import start_rank

    results = []
    ctx = engine = None
    for checkpoint, overrides in cases:
        cfg = load_config(None, [f"model.checkpoint={checkpoint}", *overrides])
        del ctx, engine  # the previous case's cache is freed before this one is sized
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        engine = None
        ctx = start_rank(cfg)
        if ctx.rank != 0:
            serve_plans(ctx)
            continue
        engine = LLMEngine(ctx)
        seen: dict[int, list[torch.Tensor]] = {}
        engine.on_logits = lambda request, row: seen.setdefault(request.request_id, []).append(row.clone())
        done = engine.generate([PromptInput(prompt_token_ids=p, params=params) for p, params in inputs])
        engine.shutdown()
        results.append({"tokens": [r.output_token_ids for r in done],
                        "logits": [torch.stack(seen[r.request_id]) for r in done],
                        "reasons": [r.finish_reason for r in done],
                        "texts": [r.text for r in done],
                        "preemptions": engine.scheduler.num_preemptions,
                        "cached_tokens": [r.num_cached_tokens for r in done],  # from the prefix cache
                        "prefix_stats": engine.scheduler.blocks.stats.as_tuple(),
                        "graph_steps": ctx.worker.graph_steps,  # rank 0 is always a model worker
                        "steps": len(engine.stats)})
    return results
