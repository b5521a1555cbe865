"""A batch job killed mid-way and restarted with --resume yields every id exactly once, with the
reference model's tokens. While it runs, a second job on the same output is refused (the file is
locked); SIGKILL to torchrun alone takes every rank with it within seconds (each rank is in a
session of its own: without that, the old job would go on writing beside the resumed one)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from server_proc import child_pids, wait_gone
from spawn_ranks import free_port
from tiny_models import make_tokenizer, reference_generate
from torchrun import ROOT, lamina

from megatron_lamina.requests.sampling_params import SamplingParams

N, MAX_TOKENS = 12, 200


def _cmd(config, job, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", str(ROOT / "launcher" / "generate.py"), "--config", str(config),
            "--input", str(job), "--output", str(out), "--quiet", *extra]


def test_killed_job_resumes_without_loss_or_duplicates(tmp_path, tiny_models):
    model = tiny_models["untied"]
    config = tmp_path / "job.yaml"
    config.write_text(f"model:\n  checkpoint: {model.canonical_dir}\nparallel:\n  attention_workers: 1\n"
                      "scheduler:\n  max_batch_size: 1\n  micro_batches: 1\nkv_cache:\n  block_size: 4\n  num_blocks: 128\n")
    prompts = [" ".join(f"w{10 + (i * 7 + j) % 200}" for j in range(3 + i % 5)) for i in range(N)]
    job = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"r{i}", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
             for i, p in enumerate(prompts)]
    job.write_text("\n".join(lines[:5] + ["{broken"] + lines[5:]) + "\n")
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    first = subprocess.Popen(_cmd(config, job, out), cwd=ROOT, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and first.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 4:  # the error record and 3 results
            break
        time.sleep(0.01)
    ranks = child_pids(first.pid)
    for pid in ranks:  # held mid-way while the second job is tried, however fast the first one runs
        os.kill(pid, signal.SIGSTOP)
    assert first.poll() is None, "the job finished before it could be killed"
    assert len(ranks) == 2, ranks
    beside = lamina("generate", "--config", str(config), "--input", str(job), "--output", str(out), "--resume")
    assert beside.returncode == 2 and beside.stderr.startswith(f"error: {out}: another job (pid "), beside.stderr
    assert "is writing it" in beside.stderr and len(beside.stderr.splitlines()) == 1
    for pid in ranks:  # running again when torchrun dies
        os.kill(pid, signal.SIGCONT)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    left = wait_gone(ranks, timeout=5)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], "ranks outlived torchrun"
    written = out.read_text().count("\n")
    assert 4 <= written < N + 1
    with open(out, "a") as f:  # as if the kill had cut a record in half
        f.write('{"id": "r11", "text": "w1')

    # The first job ran one request at a time, so that it is killed mid-way; the resumed one
    # batches what is left, with the blocks for it (greedy tokens do not depend on the batch).
    batched = ["--set", f"scheduler.max_batch_size={N}", "--set", "kv_cache.num_blocks=1024"]
    second = subprocess.run(_cmd(config, job, out, "--resume", *batched), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 1, second.stderr[-3000:]  # the broken line has an error record
    summary = (f"summary: {N + 1 - written} ok, 0 failed, {written} skipped by --resume (1 of them failed earlier); "
               f"records in {out}")
    assert summary in second.stderr.splitlines(), second.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [r["id"] for r in records]
    assert sorted(ids, key=str) == sorted([f"r{i}" for i in range(N)] + [None], key=str)  # once each
    assert [r["line"] for r in records if r["id"] is None] == [6]

    tok = make_tokenizer()
    expected, _ = reference_generate(model.hf_dir, [tok(p)["input_ids"] for p in prompts],
                                     [SamplingParams(max_tokens=MAX_TOKENS, temperature=0)] * N)
    by_id = {r["id"]: r for r in records}
    for i, tokens in enumerate(expected):
        assert by_id[f"r{i}"]["token_ids"] == tokens, i
