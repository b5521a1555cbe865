"""Offline batch generation: JSONL in, JSONL out, under torchrun.

    torchrun --nproc-per-node N launcher/generate.py --config CFG --input IN.jsonl --output OUT.jsonl

N must equal parallel.tensor_parallel + parallel.attention_workers. Rank 0 reads the input,
feeds every line to the continuous-batching engine and appends one output record per input
line as soon as it finishes (flushed; error records for malformed lines, see
engine/batch_job.py), with a progress bar; the other ranks execute the step plans it
broadcasts. `--resume` keeps what an interrupted run already wrote and runs only the
missing ids, so a killed job restarted with it loses and duplicates nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from megatron_lamina.config import add_config_arguments  # noqa: E402


def run_job(engine, input_path: str, output_path: str, show: bool, resume: bool) -> int:
    """Run every line of the input through the engine; returns how many lines failed."""
    from tqdm import tqdm

    from megatron_lamina.engine.batch_job import completed_keys, read_batch, write_record

    lines = read_batch(input_path)
    done = completed_keys(output_path) if resume else set()
    failed = 0
    with open(output_path, "a" if resume else "w", encoding="utf-8") as out:
        todo = [line for line in lines if line.key not in done]
        for line in todo:
            if line.error is None:
                try:
                    engine.add_request(line.item)
                    continue
                except ValueError as e:
                    line.error = f"line {line.line_no}: {e}"
            failed += 1
            print(f"{input_path}:{line.error}", file=sys.stderr)
            write_record(out, line.error_record())
        bar = tqdm(total=len(lines), initial=len(lines) - len(todo) + failed, unit="req",
                   disable=None, dynamic_ncols=True)
        generated, started = 0, time.monotonic()
        while engine.has_work():
            updated = engine.step()
            generated += len(updated)
            bar.set_postfix_str(f"{generated / max(time.monotonic() - started, 1e-9):.1f} tok/s")
            for request in updated:
                if request.finished:
                    write_record(out, {"id": request.user_id, "text": request.text,
                                       "token_ids": request.output_token_ids,
                                       "finish_reason": request.finish_reason})
                    bar.update(1)
                    if show:
                        bar.write(f"[{request.user_id}] {request.text}")
        bar.close()
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--input", required=True, help="JSONL file, one request per line")
    parser.add_argument("--output", required=True, help="JSONL file for the results")
    parser.add_argument("--quiet", action="store_true", help="do not print the answers")
    parser.add_argument("--resume", action="store_true",
                        help="keep the records already in --output and run only the ids missing there")
    args = parser.parse_args(argv)
    if not Path(args.input).is_file():
        if os.environ.get("RANK", "0") == "0":
            print(f"error: --input {args.input}: no such file", file=sys.stderr)
        return 2
    from megatron_lamina.engine.runtime import serve_plans, start_from_args

    ctx = start_from_args(args)
    if ctx is None:
        return 2
    if ctx.rank == 0:
        from megatron_lamina.engine.llm_engine import LLMEngine

        engine = LLMEngine(ctx)
        try:
            run_job(engine, args.input, args.output, show=not args.quiet, resume=args.resume)
        finally:
            engine.shutdown()
    else:
        serve_plans(ctx)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
