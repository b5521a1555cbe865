"""What the server does under faults, on real torchrun jobs (tiny model, 1 model worker and 1
attention worker; 2 where an attention worker is the victim, so that one survives it):

* queue bound reached: 503 with an OpenAI error body;
* SIGTERM to the driver: /health and new requests 503 (draining), in-flight requests finish,
  the job exits 0; requests still running at `server.drain_timeout_s` end with an error their
  callers receive (plain: an OpenAI error body; streamed: an error event, then [DONE]), and the
  job still exits 0;
* an attention worker killed (SIGKILL) mid-request: in-flight requests fail with an error
  body (non-streaming: 503; streaming: an error event, then [DONE]), the job exits non-zero
  within a bound;
* an attention worker that stops answering (SIGSTOP): the step times out after
  runtime.step_timeout_s, requests fail with an error, the job exits non-zero;
* the HTTP front end (a process of its own, a child of rank 0): SIGTERM to it drains as
  SIGTERM to rank 0 does; killed (SIGKILL), the engine notices, releases the other ranks and
  the job exits non-zero with every rank gone.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from server_proc import ServerProcess, tiny_server_config, wait_gone
from server_proc import attention_workers as workers  # (_start's argument has its name)

LONG = {"prompt": "w5 w6 w7", "max_tokens": 250, "ignore_eos": True}


def _start(tmp_path, tiny_models, attention_workers: int = 1, **sections) -> ServerProcess:
    """A server of its own (each test here ends it); a rank fewer than the shared server's where
    the layout is not the subject: every rank is a start-up of torch."""
    config, port = tiny_server_config(tmp_path, tiny_models["untied"].canonical_dir, **workers(attention_workers),
                                      **sections)
    return ServerProcess(config, port, 1 + attention_workers, tmp_path / "server.log").wait_healthy()


def _in_background(fn) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except Exception as e:  # noqa: BLE001 - reported by the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _post(server, body, timeout=120):
    return lambda: httpx.post(f"{server.url}/v1/completions", json=body, timeout=timeout)


def _stream_events(server, body, timeout=120):
    def run():
        events = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True},
                          timeout=timeout) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        return events
    return run


def _wait_running(server, n, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        running = [float(x.split()[1]) for x in text.splitlines() if x.startswith("lamina_requests_running ")]
        if running and running[0] >= n:
            return
        time.sleep(0.02)
    raise TimeoutError("requests did not start")


def test_queue_bound_then_sigterm_drains_and_exits_zero(tmp_path, tiny_models):
    server = _start(tmp_path, tiny_models, server={"max_queued_requests": 2, "drain_timeout_s": 60})
    try:
        first = [_in_background(_post(server, LONG)) for _ in range(2)]
        _wait_running(server, 2)
        full = httpx.post(f"{server.url}/v1/completions", json={"prompt": "w5", "max_tokens": 2}, timeout=30)
        assert full.status_code == 503 and "too many requests" in full.json()["error"]["message"]

        os.kill(server.rank_pid(0), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "w5"}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"

        for thread, box in first:
            thread.join(timeout=120)
            response = box["result"]
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["finish_reason"] == "length"
            assert response.json()["usage"]["completion_tokens"] == 250
        assert server.proc.wait(timeout=60) == 0, server.output()[-3000:]
    finally:
        server.stop()


def test_drain_deadline_fails_what_is_left_and_exits_zero(tmp_path, tiny_models):
    server = _start(tmp_path, tiny_models, server={"drain_timeout_s": 0.5})
    try:
        plain = _in_background(_post(server, LONG))
        streamed = _in_background(_stream_events(server, LONG))
        _wait_running(server, 2)
        os.kill(server.rank_pid(0), signal.SIGTERM)
        plain[0].join(timeout=60)
        response = plain[1]["result"]
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == "server_error" and "server.drain_timeout_s" in error["message"]
        streamed[0].join(timeout=60)
        events = streamed[1]["result"]
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        assert "server.drain_timeout_s" in json.loads(events[-2])["error"]["message"]
        assert server.proc.wait(timeout=60) == 0, server.output()[-3000:]
        assert "Event loop is closed" not in server.output()
    finally:
        server.stop()


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_attention_worker_fault_fails_requests_and_exits(tmp_path, tiny_models, fault):
    server = _start(tmp_path, tiny_models, attention_workers=2,
                    runtime={"step_timeout_s": 2})  # a hang is found this long after it
    try:
        plain = _in_background(_post(server, LONG))
        streamed = _in_background(_stream_events(server, LONG))
        _wait_running(server, 2)
        victim = server.rank_pid(2)
        started = time.monotonic()
        os.kill(victim, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)

        plain[0].join(timeout=60)
        response = plain[1]["result"]
        assert response.status_code == 503, response.text
        assert "the engine failed" in response.json()["error"]["message"]
        streamed[0].join(timeout=60)
        events = streamed[1]["result"]
        assert events[-1] == "[DONE]"
        assert "the engine failed" in json.loads(events[-2])["error"]["message"]
        if fault == "hang":  # found; torchrun's own 30 s grace for a stopped rank's SIGTERM is not ours to wait
            os.kill(victim, signal.SIGCONT)
        code = server.proc.wait(timeout=90)
        assert code != 0
        assert time.monotonic() - started < 90
        assert "error: the engine failed" in server.output()
    finally:
        if fault == "hang":
            try:
                os.kill(victim, signal.SIGCONT)
            except (ProcessLookupError, UnboundLocalError):
                pass
        server.stop()


def test_sigterm_to_the_front_end_drains_and_exits_zero(tmp_path, tiny_models):
    server = _start(tmp_path, tiny_models, server={"drain_timeout_s": 60})
    try:
        running = _in_background(_post(server, LONG))
        _wait_running(server, 1)
        os.kill(server.frontend_pid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(f"{server.url}/health").json()["status"] == "draining"
        running[0].join(timeout=120)
        response = running[1]["result"]
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 250, response.text
        assert server.proc.wait(timeout=60) == 0, server.output()[-3000:]
    finally:
        server.stop()


def test_front_end_killed_ends_the_job_and_its_ranks(tmp_path, tiny_models):
    server = _start(tmp_path, tiny_models)
    try:
        ranks = server.worker_pids()
        running = _in_background(_post(server, LONG))
        _wait_running(server, 1)
        started = time.monotonic()
        os.kill(server.frontend_pid(), signal.SIGKILL)
        running[0].join(timeout=30)
        assert isinstance(running[1].get("error"), httpx.HTTPError)  # its connection went with the front end
        assert server.proc.wait(timeout=60) != 0
        assert time.monotonic() - started < 60
        assert "error: the HTTP front end exited" in server.output()
        assert wait_gone(ranks, timeout=10) == []
    finally:
        server.stop()
