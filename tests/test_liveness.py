"""`runtime.step_timeout_s` measures a rank's silence, not the length of the work (issue 23), on
real torchrun jobs of the tiny model (1 model worker, 1 attention worker), each with a short
timeout:

* a prefill step longer than the timeout (a long prompt, whose step tests/faults makes last
  three timeouts after its last attention exchange, as on a slow device) completes with the
  reference model's tokens; then an attention worker stopped (SIGSTOP) while the server is
  idle is still found by the driver's heartbeat: the job ends with an error naming it;
* a batch job of many lines writes every record (its input goes into the engine as it steps;
  the heartbeat covers what the driver does between steps);
* the HTTP front end stopped (SIGSTOP) for several timeouts while streams run: the engine
  keeps its ranks alive and stops stepping once the front end is far enough behind; on
  SIGCONT every stream ends with exactly the tokens of the same requests run unstalled.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from server_proc import ServerProcess, attention_workers, tiny_server_config
from test_server_faults import _wait_running
from tiny_models import make_tokenizer, reference_generate
from torchrun import lamina

from megatron_lamina.requests.sampling_params import SamplingParams

STEP_TIMEOUT_S = 2.0
FAULTS = Path(__file__).resolve().parent / "faults"


def test_a_prefill_longer_than_the_timeout_completes_and_a_hung_rank_is_found(tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAULTS)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    monkeypatch.setenv("LAMINA_TEST_FAULT", f"slow_prefill:{3 * STEP_TIMEOUT_S}")
    model = tiny_models["untied"]
    prompt = " ".join(f"w{5 + i % 200}" for i in range(200))  # a step of 201 prompt tokens
    ids = make_tokenizer()(prompt)["input_ids"]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = reference_generate(model.hf_dir, [ids], [greedy])[0][0]
    config = tiny_server_config(tmp_path, model.canonical_dir, runtime={"step_timeout_s": STEP_TIMEOUT_S},
                                scheduler={"micro_batches": 1, "max_prefill_tokens": 256}, **attention_workers(1))
    server = ServerProcess(*config, 2, tmp_path / "server.log").wait_healthy()
    victim = None
    try:
        response = httpx.post(f"{server.url}/v1/completions", timeout=120,
                              json={"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                                    "return_token_ids": True})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["token_ids"] == expected
        assert f"fault: slow_prefill slept {3 * STEP_TIMEOUT_S:g} s" in server.output()  # the step was long

        victim = server.rank_pid(1)  # the attention worker
        os.kill(victim, signal.SIGSTOP)  # idle: no plan goes out, only the heartbeat can find it
        server.wait_logged("error: the engine failed")
        # Found. torchrun now closes the job with SIGTERM, which a stopped rank holds until torchrun's
        # own grace (30 s) ends in SIGKILL: that wait is torchrun's, not ours, so the rank is resumed.
        os.kill(victim, signal.SIGCONT)
        assert server.proc.wait(timeout=120) != 0
        log = server.output()
        assert "error: the engine failed: RuntimeError: rank 1 (attention worker" in log, log[-3000:]
        assert "stopped answering the driver's heartbeat" in log, log[-3000:]
    finally:
        if victim is not None:
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass
        server.stop()


def test_a_large_batch_job_with_a_short_timeout_writes_every_record(tmp_path, tiny_models):
    lines = 6000
    job = tmp_path / "in.jsonl"
    job.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": " ".join(["w7"] * 40)}],
                                       "max_tokens": 1, "ignore_eos": True}) + "\n" for i in range(lines)))
    config = tmp_path / "tiny.yaml"
    config.write_text(f"model:\n  checkpoint: {tiny_models['untied'].canonical_dir}\n"
                      "parallel:\n  tensor_parallel: 1\n  attention_workers: 1\n  attention_head_groups: 1\n"
                      f"runtime:\n  step_timeout_s: {STEP_TIMEOUT_S}\n"
                      "scheduler:\n  max_batch_size: 256\n  max_prefill_tokens: 4096\n  micro_batches: 1\n"
                      "kv_cache:\n  block_size: 16\n  num_blocks: 1024\n")
    out = tmp_path / "out.jsonl"
    result = lamina("generate", "--config", str(config), "--input", str(job), "--output", str(out), "--quiet",
                    timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == list(range(lines))
    assert all(r["finish_reason"] == "length" and len(r["token_ids"]) == 1 for r in records)
    assert result.stderr.splitlines()[-1] == f"summary: {lines} ok, 0 failed; records in {out}"


def test_a_stopped_front_end_loses_nothing(tmp_path, tiny_models):
    server = ServerProcess(*tiny_server_config(tmp_path, tiny_models["untied"].canonical_dir, **attention_workers(1),
                                               runtime={"step_timeout_s": STEP_TIMEOUT_S}),
                           2, tmp_path / "server.log").wait_healthy()
    bodies = [{"prompt": f"w{5 + i} w6", "max_tokens": 240, "temperature": 0, "ignore_eos": True,
               "return_token_ids": True} for i in range(12)]
    try:
        def post(body):
            return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(len(bodies)) as pool:  # all at once, as the streams below run
            unstalled = list(pool.map(post, bodies))

        def stream(body, box):
            with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True},
                              timeout=120) as r:
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", events
            box.extend(t for e in events[:-1] for t in json.loads(e)["choices"][0].get("token_ids") or [])

        boxes = [[] for _ in bodies]
        threads = [threading.Thread(target=stream, args=(b, box)) for b, box in zip(bodies, boxes)]
        for thread in threads:
            thread.start()
        _wait_running(server, len(bodies))
        frontend = server.frontend_pid()
        os.kill(frontend, signal.SIGSTOP)
        try:
            time.sleep(4 * STEP_TIMEOUT_S)  # the stall: the engine's messages fill the pipe and its queue
        finally:
            os.kill(frontend, signal.SIGCONT)
        for thread in threads:
            thread.join(timeout=120)
        assert boxes == unstalled
        assert server.proc.poll() is None and httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()
