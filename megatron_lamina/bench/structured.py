"""Structured outputs' cost on a real server (issue 27): the closed batch with and without schemas.

`run` starts the server (`ServerJob`: torchrun launcher/serve.py with the config and
overrides given) on a checkpoint whose tokenizer is a real BPE one (xgrammar needs token
texts: a random-weight checkpoint gets the default model's tokenizer put in place of its
word-level one), sends the closed batch (tools/bench_serving.py's program) once with no
schema and once with `--schema-share` of the requests under `BENCH_FORMAT`, and reports the
output tokens/s of both and their ratio (issue 27's target: >= 0.9). `BENCH_FORMAT`'s JSON
cannot end before the batch's output length, so a constrained request produces as many
tokens as an unconstrained one (min_tokens, ignore_eos). Then the compile time of a schema
never seen (a request's latency with one output token, and `GrammarCompiler` alone in this
process) against the same schema again (cached). Used by tools/bench_structured.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from pathlib import Path

import httpx

from megatron_lamina.bench import serving_replay
from megatron_lamina.bench.ranks import free_port
from megatron_lamina.bench.server_job import ServerJob

# At least 200 rows of at least 8 tokens each: longer than any closed batch's output here.
BENCH_SCHEMA = {"type": "object", "properties": {"rows": {"type": "array", "minItems": 200, "items": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                     "name": {"type": "string", "maxLength": 12}},
    "required": ["id", "name"]}}}, "required": ["rows"]}
BENCH_FORMAT = {"type": "json_schema", "json_schema": {"name": "rows", "schema": BENCH_SCHEMA}}


def use_tokenizer(checkpoint: Path, tokenizer_dir: Path) -> None:
    """Put `tokenizer_dir` (a Hugging Face tokenizer) in place of the checkpoint's own."""
    target = checkpoint / "tokenizer"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(tokenizer_dir, target)


def closed_batch(url: str, args, share: float, out: Path) -> dict:
    argv = ["--url", url, "--closed", str(args.closed), "--input-len", str(args.input_len), "--output-len",
            str(args.output_len), "--temperature", str(args.temperature), "--schema-share", str(share),
            "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()):
        serving_replay.main(argv)
    return json.loads(out.read_text())


def request_latency(url: str, schema: dict) -> float:
    started = time.perf_counter()
    answer = httpx.post(f"{url}/v1/completions", timeout=600, json={
        "prompt": "Rows:", "max_tokens": 1, "response_format": {"type": "json_schema", "json_schema": {
            "name": "s", "schema": schema}}})
    answer.raise_for_status()
    return time.perf_counter() - started


def compile_times(tokenizer_dir: Path, vocab_size: int, schema: dict) -> dict:
    """`GrammarCompiler` alone: a first compile of `schema`, then the same again (the cache)."""
    from transformers import AutoTokenizer

    from megatron_lamina.requests.grammar import GrammarCompiler
    from megatron_lamina.requests.structured_output import StructuredOutput

    compiler = GrammarCompiler(AutoTokenizer.from_pretrained(str(tokenizer_dir)), vocab_size, None)
    spec = StructuredOutput.json_schema(schema)
    started = time.perf_counter()
    compiler.compile(spec).result()
    first = time.perf_counter() - started
    started = time.perf_counter()
    compiler.compile(spec).result()
    return {"first_s": first, "cached_s": time.perf_counter() - started}


def run(args, out_dir: Path, log) -> dict:
    port = free_port()
    server = ServerJob(args.set or [], args.config, port, out_dir / "server.log", cpu=args.device == "cpu",
                       nproc=args.nproc)
    result: dict = {"closed": args.closed, "input_len": args.input_len, "output_len": args.output_len,
                    "schema_share": args.schema_share}
    try:
        server.wait_healthy(args.ready_timeout)
        result["ready_s"] = server.ready_s
        fresh = dict(BENCH_SCHEMA, title=f"fresh-{time.time_ns()}")  # a schema no cache holds yet
        result["request_first_s"] = request_latency(server.url, fresh)
        result["request_cached_s"] = request_latency(server.url, fresh)
        log(f"a 1-token request with a new schema: {result['request_first_s']:.3f} s, "
            f"then cached: {result['request_cached_s']:.3f} s")
        request_latency(server.url, BENCH_SCHEMA)  # its compile is not the batch's: cached before it
        plain = closed_batch(server.url, args, 0.0, out_dir / "closed-plain.json")
        shared = closed_batch(server.url, args, args.schema_share, out_dir / "closed-schema.json")
        for name, report in (("plain", plain), ("schema", shared)):
            result[name] = {k: report.get(k) for k in ("completed", "failed", "wall_s", "output_throughput_tok_s",
                                                        "failures")}
            log(f"closed batch, {name}: {report['output_throughput_tok_s']:.0f} output tok/s "
                f"({report['completed']} completed)")
        result["ratio"] = shared["output_throughput_tok_s"] / plain["output_throughput_tok_s"]
        log(f"schema / plain output tokens/s: {result['ratio']:.3f} (target >= 0.9)")
    finally:
        server.stop()
    result["compile_in_process"] = compile_times(args.tokenizer, args.vocab_size, dict(BENCH_SCHEMA, title="direct"))
    log(f"GrammarCompiler alone: first {result['compile_in_process']['first_s'] * 1e3:.1f} ms, "
        f"cached {result['compile_in_process']['cached_s'] * 1e3:.3f} ms")
    return result
