"""The batch job's loop on the driver: every input line to exactly one output record.

`run_batch` skips the lines whose key an earlier run already wrote (`--resume`), writes an
error record for each line that cannot run (`BatchLine.error`, or what the engine refuses:
a prompt longer than the context, `max_tokens` beyond it, messages the chat template
refuses, with the server's messages), feeds the rest to the continuous-batching engine and
writes each record as its request finishes. The lines go in as the engine steps, a window
ahead of what it runs (`ADMIT_AHEAD` batches), so the first step comes at once however long
the input, and the tokens of lines not yet near their turn take no memory. Whatever one
line raises, in its admission or in the engine (`LLMEngine.fail_request`), becomes that
line's error record; the others go on. Progress goes to stderr: a bar on a terminal, otherwise one line every
`progress_interval_s` (a log file or CI shows that the job moves). It returns the
`BatchSummary` whose line ends the job; the launcher's exit status is `summary.exit_code`.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from dataclasses import dataclass

from megatron_lamina.batch.batch_job import BatchLine
from megatron_lamina.batch.batch_output import BatchOutput
from megatron_lamina.driver.request import Request
from megatron_lamina.requests.output import TokenLogprob
from megatron_lamina.requests.request_schema import check_max_tokens, check_token_ids
from megatron_lamina.requests.tokenizer import TextCodec

# Lines admitted ahead of the running batch, in batches of `scheduler.max_batch_size`: the
# scheduler always has the next batch's prompts waiting when a running request ends.
ADMIT_AHEAD = 2


@dataclass
class BatchSummary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0          # already in the output (--resume)
    skipped_failed: int = 0   # of those, error records
    unfinished: int = 0       # stopped by a signal before they finished
    tokens: int = 0           # generated, and the seconds the engine took for them
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every line of the input has a result in the output, 1 when some have an error."""
        return 1 if self.failed or self.skipped_failed else 0

    def line(self, output: str) -> str:
        skipped = (f", {self.skipped} skipped by --resume ({self.skipped_failed} of them failed earlier)"
                   if self.skipped else "")
        if self.unfinished:
            return (f"stopped: {self.ok} ok, {self.failed} failed{skipped}, {self.unfinished} unfinished; records in "
                    f"{output} (run again with --resume to finish)")
        return f"summary: {self.ok} ok, {self.failed} failed{skipped}; records in {output}"

    def throughput(self) -> str:
        return (f"generated {self.tokens} tokens in {self.seconds:.2f} s "
                f"({self.tokens / max(self.seconds, 1e-9):.1f} tokens/s)")


def run_batch(engine, input_name: str, lines: list[BatchLine], output: BatchOutput, show: bool,
              progress_interval_s: float, stop: threading.Event | None = None) -> BatchSummary:
    """Run the lines of `input_name` on the driver's `LLMEngine`; error lines go to stderr too.
    Once `stop` is set no further step runs (the launcher then shuts the engine down)."""
    stop = stop or threading.Event()
    summary = BatchSummary()
    todo = []
    for line in lines:
        if line.key in output.done:
            summary.skipped += 1
            summary.skipped_failed += output.done[line.key]
        else:
            todo.append(line)
    progress = Progress(len(lines), summary.skipped, progress_interval_s)
    running: dict[int, BatchLine] = {}  # engine request id -> its line
    pending = iter(todo)
    ahead = ADMIT_AHEAD * engine.scheduler.max_batch_size

    def fail(line: BatchLine, message: str | None = None) -> None:
        if message is not None:
            line.fail(message)
        summary.failed += 1
        progress.done += 1
        print(f"{input_name}:{line.error}", file=sys.stderr, flush=True)
        output.write(line.error_record())

    while not stop.is_set():
        while len(engine.scheduler.waiting) < ahead and (line := next(pending, None)) is not None:
            if line.error is not None:
                fail(line)
                continue
            try:
                running[_admit(engine, line).request_id] = line
            except ValueError as e:  # RequestError, the chat template's, or the scheduler's: never fits
                fail(line, str(e))
            except Exception as e:  # noqa: BLE001 - a fault of ours with this line: it fails alone
                print(f"error: line {line.line_no} failed; the others go on:", file=sys.stderr)
                traceback.print_exception(e, file=sys.stderr)
                fail(line, f"internal error while processing this line ({type(e).__name__}: {e})")
        if not engine.has_work():
            break
        updated = engine.step()
        progress.tokens += len(updated)
        for request in updated:
            if not request.finished:
                continue
            line = running.pop(request.request_id)
            if request.error is not None:
                fail(line, request.error)
                continue
            output.write(record(request, engine.codec))
            summary.ok += 1
            progress.done += 1
            if show:
                progress.write(f"[{request.user_id}] {request.text}")
        progress.show()
    progress.close()
    summary.unfinished = len(lines) - summary.skipped - summary.failed - summary.ok
    summary.tokens, summary.seconds = progress.tokens, time.monotonic() - progress.started
    return summary


def _admit(engine, line: BatchLine) -> Request:
    """The line's request, checked as the server checks one, and queued; ValueError names the problem."""
    max_model_len = engine.ctx.arch.max_position_embeddings
    request = engine.make_request(line.item)
    engine.scheduler.check_fits(request)  # the prompt first, as the server checks
    check_max_tokens(request.params.max_tokens, request.num_tokens, max_model_len)
    check_token_ids(request.params, engine.ctx.arch.vocab_size)
    engine.admit(request)
    return request


def record(request: Request, codec: TextCodec) -> dict:
    """A finished request's output line; `logprobs` / `prompt_logprobs` when it asked for them:
    per token its text, id, log-probability (raw logits, before temperature and penalties)
    and the top alternatives (the prompt's first token has none: null)."""
    out = {"id": request.user_id, "text": request.text, "token_ids": request.output_token_ids,
           "finish_reason": request.finish_reason}
    if request.params.logprobs is not None:
        out["logprobs"] = [_logprob(codec, t, e) for t, e in zip(request.output_token_ids, request.output_logprobs)]
    if request.params.prompt_logprobs is not None:
        out["prompt_logprobs"] = [_logprob(codec, t, e)
                                  for t, e in zip(request.prompt_token_ids, request.prompt_logprobs)]
    return out


def _logprob(codec: TextCodec, token_id: int, entry: TokenLogprob | None) -> dict | None:
    if entry is None:
        return None
    return {"token": codec.token_text(token_id), "token_id": token_id, "logprob": entry.logprob,
            "top_logprobs": [{"token": codec.token_text(t), "token_id": t, "logprob": lp} for t, lp in entry.top]}


class Progress:
    """Lines done and tokens/s on stderr: a tqdm bar on a terminal, else a line every `interval_s`."""

    def __init__(self, total: int, done: int, interval_s: float):
        self.total, self.done, self.tokens = total, done, 0
        self.interval_s, self.started = interval_s, time.monotonic()
        self._next_line = self.started + interval_s
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, unit="req", dynamic_ncols=True)

    def rate(self) -> float:
        return self.tokens / max(time.monotonic() - self.started, 1e-9)

    def show(self) -> None:
        if self._bar is not None:
            self._bar.n = self.done
            self._bar.set_postfix_str(f"{self.rate():.1f} tok/s")
        elif time.monotonic() >= self._next_line:
            self._next_line = time.monotonic() + self.interval_s
            print(f"progress: {self.done}/{self.total} lines, {self.tokens} tokens, {self.rate():.1f} tok/s",
                  file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.n = self.done
            self._bar.close()
