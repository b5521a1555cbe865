"""`lamina` and the launcher scripts as a user meets them: --help, mistakes, no orphans, and the
Quick start that CI runs.

Every launcher lists its options; a config or layout mistake is one `error:` line from the
launcher before any rank starts (no torchrun traceback); a launcher script run without a
launcher names the command that starts the job. `lamina serve` starts the ranks the config
asks for and serves; killed with SIGKILL, it takes every rank with it within seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from server_proc import ServerProcess, child_pids, tiny_server_config, wait_gone
from torchrun import ROOT, lamina, torchrun


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("cmd, options", [
    (["-m", "megatron_lamina.cli", "--help"], ["serve", "generate", "convert"]),
    (["-m", "megatron_lamina.cli", "serve", "--help"], ["--config", "--set"]),
    (["-m", "megatron_lamina.cli", "generate", "--help"], ["--config", "--input", "--output", "--resume",
                                                           "--progress-interval"]),
    (["-m", "megatron_lamina.cli", "convert", "--help"], ["--source", "--input", "--output", "--dtype"]),
    (["launcher/serve.py", "--help"], ["--config", "--set"]),
    (["launcher/generate.py", "--help"], ["--input", "--output", "--resume"]),
    (["tools/convert_checkpoint.py", "--help"], ["--source", "--model-config"]),
])
def test_every_launcher_lists_its_options(cmd, options):
    result = _run(*cmd)
    assert result.returncode == 0, result.stderr
    for option in options:
        assert option in result.stdout, (option, result.stdout)


def _mistakes(tmp_path, checkpoint):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    config, _ = tiny_server_config(tmp_path, checkpoint)
    job = tmp_path / "in.jsonl"
    job.write_text('{"id": 1, "prompt": "w5"}\n')
    common = ["--config", str(config)]
    io = ["--input", str(job), "--output", str(tmp_path / "out.jsonl")]
    return busy, [
        (["serve", *common, "--set", "scheduler.micro_batchez=2"],
         "error: config: unknown key 'scheduler.micro_batchez'"),
        (["generate", *common, "--set", "parallel.tensor_parallel=3", *io],
         "error: config: parallel.tensor_parallel = 3"),
        (["serve", *common, "--set", "model.checkpoint=nowhere"],
         "error: model.checkpoint: nowhere: no such file or directory: not "),
        (["generate", *common, "--input", str(tmp_path / "missing.jsonl"), "--output", "x.jsonl"],
         f"error: --input {tmp_path / 'missing.jsonl'}: no such file"),
        (["serve", *common, "--set", f"server.port={busy.getsockname()[1]}"],
         f"error: config: server.host:server.port = 127.0.0.1:{busy.getsockname()[1]}: cannot listen there"),
    ]


def test_mistakes_are_one_line_before_any_rank(tmp_path, tiny_models):
    busy, cases = _mistakes(tmp_path, tiny_models["untied"].canonical_dir)
    with busy:
        for args, line in cases:
            started = time.monotonic()
            result = lamina(*args, timeout=60)
            assert result.returncode == 2, result.stderr
            assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(line), \
                result.stderr
            assert time.monotonic() - started < 20  # refused by the launcher, not by a rank


def test_torchrun_serve_on_a_port_in_use_fails_before_the_model_loads(tmp_path, tiny_models):
    """Under torchrun (no `lamina` check first) rank 0 binds the port before anything loads and
    hands the socket to the front end: a port in use is one error line naming the keys, exit 2,
    and no rank builds a model (it used to load, then the front end died at uvicorn's bind)."""
    config, _ = tiny_server_config(tmp_path, tiny_models["untied"].canonical_dir, parallel={"attention_workers": 1})
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = torchrun("launcher/serve.py", 2, "--config", str(config), "--set", f"server.port={port}",
                          timeout=120)
    assert result.returncode != 0, result.stderr
    assert f"error: config: server.host:server.port = 127.0.0.1:{port}: cannot listen there" in result.stderr, \
        result.stderr
    assert "weights loaded" not in result.stderr + result.stdout, result.stderr


def test_launcher_script_without_a_launcher_names_the_command(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  checkpoint: x\nparallel:\n  attention_workers: 2\n")
    result = _run("launcher/serve.py", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: launcher/serve.py runs as one rank of a job; start the job with: "
                                     f"lamina serve --config {config} (or: torchrun --nproc-per-node 3 "
                                     f"launcher/serve.py --config {config})")


def test_lamina_serve_counts_the_ranks_and_they_die_with_it(tmp_path, tiny_models):
    config, port = tiny_server_config(tmp_path, tiny_models["untied"].canonical_dir, parallel={"attention_workers": 1})
    server = ServerProcess(config, port, 2, tmp_path / "server.log", launcher="lamina")
    ranks: list[int] = []
    try:
        server.wait_healthy()
        ranks = server.worker_pids()
        assert len(ranks) == 2, ranks  # tensor_parallel 1 + attention_workers 1
        ranks.append(server.frontend_pid())  # rank 0's child: it goes too
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "w5 w9", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert "lamina: starting 2 ranks" in server.output()
        os.kill(server.proc.pid, signal.SIGKILL)  # the launcher alone: each rank is in a session of its own
        server.proc.wait(timeout=10)
        assert wait_gone(ranks, timeout=5) == [], "ranks (or the front end) outlived their launcher"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=2)
    finally:
        server.stop()
        for pid in wait_gone(ranks, timeout=0):  # had they outlived the launcher
            os.kill(pid, signal.SIGKILL)


def test_ci_runs_the_readme_quick_start():
    """.ci/run runs the README's Quick start commands, in order: what a new user runs first is what CI runs."""
    readme = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("```bash\n", 1)[1]
    commands = readme.split("```", 1)[0].strip().splitlines()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == commands and "lamina generate" in commands[0]


def test_ctrl_c_stops_a_batch_job_cleanly(tmp_path, tiny_models):
    """SIGINT to lamina generate: the driver stops at the next step and releases the other rank;
    a 'stopped:' line, exit status 130, no traceback, no rank left."""
    config = tmp_path / "job.yaml"
    config.write_text(f"model:\n  checkpoint: {tiny_models['untied'].canonical_dir}\n"
                      "parallel:\n  attention_workers: 1\nkv_cache:\n  block_size: 4\n  num_blocks: 256\n")
    job = tmp_path / "in.jsonl"
    job.write_text("".join(f'{{"id": {i}, "prompt": "w{i} w5", "max_tokens": 200, "ignore_eos": true}}\n'
                           for i in range(40)))
    cmd = [sys.executable, "-m", "megatron_lamina.cli", "generate", "--config", str(config), "--input", str(job),
           "--output", str(tmp_path / "out.jsonl"), "--quiet", "--progress-interval", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = []
    for line in proc.stderr:  # the first progress line: the job is stepping
        lines.append(line)
        if line.startswith("progress: "):
            break
    ranks = child_pids(proc.pid)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, lines + [rest]
    assert "Traceback" not in rest and rest.splitlines()[-1].startswith("stopped: "), rest
    assert "unfinished; records in" in rest and wait_gone(ranks, timeout=5) == []
