"""Readiness and liveness, on real torchrun jobs (tiny model, 1 model worker and 1 attention
worker, HTTP on 127.0.0.1): what an orchestrator's probes see.

* Loading: the front end answers as soon as it listens, before the model is loaded: `/health`
  (liveness) is 200 and says `loading`, `/ready` (readiness) is 503, every route that needs
  the model is a 503 with an OpenAI error body; the probes and `/metrics` need no API key.
  Loading is held open by stopping an attention worker (SIGSTOP) once rank 0 has spawned its
  front end: rank 0 cannot finish loading before every rank reached the start-up barrier,
  which it cannot reach before its own model is loaded.
* The stall watchdog: requests running, rank 0's engine stopped (SIGSTOP): `/health` and
  `/ready` turn 503 (`stalled`) after `server.stall_timeout_s`, with one `error:` line however
  long it lasts; SIGCONT: 200 again and the requests finish whole. A stopped engine with no
  request pending is not a stall.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
from server_proc import ServerProcess, attention_workers, child_pids, tiny_server_config
from test_server_faults import LONG, _in_background, _post, _stream_events, _wait_running

KEY = "health-test-key"
STALL_S = 2


def _poll(probe, timeout: float = 120.0, every: float = 0.01):
    """`probe()` until it returns something other than None; TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result is not None:
            return result
        time.sleep(every)
    raise TimeoutError(f"{probe} gave nothing within {timeout} s")


def _rank_pid(server: ServerProcess, rank: int) -> int | None:
    try:
        return server.rank_pid(rank)
    except LookupError:
        return None


def _front_end_spawned(server: ServerProcess) -> bool | None:
    """True once rank 0 has a child started by multiprocessing's spawn (its HTTP front end)."""
    rank0 = _rank_pid(server, 0)
    for pid in child_pids(rank0) if rank0 is not None else []:
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return None


def _answer(url: str, **kwargs) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5, **kwargs)
    except httpx.TransportError:  # not listening yet
        return None


def _resume(pid: int | None) -> None:
    if pid is not None:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_loading_is_alive_but_not_ready(tmp_path: Path, tiny_models):
    config, port = tiny_server_config(tmp_path, tiny_models["untied"].canonical_dir, **attention_workers(1),
                                      runtime={"step_timeout_s": 120}, server={"api_key": KEY})
    server = ServerProcess(config, port, 2, tmp_path / "server.log")
    late = None
    try:
        _poll(lambda: _front_end_spawned(server), every=0.05)  # each look reads every process's /proc entry
        late = server.rank_pid(1)  # the attention worker
        os.kill(late, signal.SIGSTOP)  # the start-up barrier waits for it
        health = _poll(lambda: _answer(f"{server.url}/health"))
        assert health.status_code == 200, health.text
        assert health.json() == {"status": "loading", "error": None}, "ready before the worker stopped? " + health.text
        ready = httpx.get(f"{server.url}/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "loading", ready.text
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        auth = {"Authorization": f"Bearer {KEY}"}
        for method, path, body in (("POST", "/v1/completions", {"prompt": "w5", "max_tokens": 2}),
                                   ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}]}),
                                   ("GET", "/v1/models", None), ("POST", "/tokenize", {"prompt": "w5"})):
            refused = httpx.request(method, f"{server.url}{path}", json=body, headers=auth, timeout=30)
            assert refused.status_code == 503, (path, refused.text)
            error = refused.json()["error"]
            assert error["type"] == "server_error" and "the model is loading" in error["message"], (path, error)
        assert httpx.get(f"{server.url}/v1/models").status_code == 401  # the key first, loading or not
        assert "serving " not in server.output()

        os.kill(late, signal.SIGCONT)
        server.wait_healthy()
        assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "error": None}
        answer = httpx.post(f"{server.url}/v1/completions", json={"prompt": "w5 w9", "max_tokens": 3},
                            headers=auth, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3, answer.text
        log = server.output()
        assert log.index("listening on") < log.index("serving "), log[-3000:]
    finally:
        _resume(late)
        server.stop()


def _stalled_for(server: ServerProcess) -> int | None:
    """Seconds the stalled /health reports (None while it is not stalled); /ready agrees."""
    health = httpx.get(f"{server.url}/health", timeout=5)
    if health.status_code == 200:
        return None
    body = health.json()
    assert health.status_code == 503 and body["status"] == "stalled", health.text
    assert httpx.get(f"{server.url}/ready", timeout=5).status_code == 503
    match = re.fullmatch(r"no engine progress for (\d+) s with 2 requests pending", body["error"])
    assert match, body
    return int(match.group(1))


def test_a_stalled_engine_fails_liveness_until_it_steps_again(tmp_path: Path, tiny_models):
    config, port = tiny_server_config(tmp_path, tiny_models["untied"].canonical_dir, **attention_workers(1),
                                      runtime={"step_timeout_s": 120}, server={"stall_timeout_s": STALL_S})
    server = ServerProcess(config, port, 2, tmp_path / "server.log").wait_healthy()
    engine = None
    try:
        engine = server.rank_pid(0)  # rank 0's main process runs the engine loop; the front end is its child
        plain = _in_background(_post(server, LONG))
        streamed = _in_background(_stream_events(server, LONG))
        _wait_running(server, 2)
        os.kill(engine, signal.SIGSTOP)
        first = _poll(lambda: _stalled_for(server), every=0.1)
        assert first >= STALL_S
        _poll(lambda: True if _stalled_for(server) >= first + 2 else None, every=0.1)  # the watchdog looked again
        assert server.output().count("error: no engine progress for") == 1, server.output()[-3000:]
        assert f"with 2 requests pending (server.stall_timeout_s = {STALL_S})" in server.output()

        os.kill(engine, signal.SIGCONT)
        _poll(lambda: True if httpx.get(f"{server.url}/health", timeout=5).status_code == 200 else None, every=0.1)
        assert httpx.get(f"{server.url}/ready").status_code == 200
        plain[0].join(timeout=120)
        response = plain[1]["result"]
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 250, response.text
        streamed[0].join(timeout=120)
        events = streamed[1]["result"]
        assert events[-1] == "[DONE]" and '"error"' not in events[-2], events[-3:]
        assert "engine progress resumed after" in server.output()

        os.kill(engine, signal.SIGSTOP)  # nothing pending: a stopped engine is no stall, however long
        time.sleep(2 * STALL_S)
        assert httpx.get(f"{server.url}/health").status_code == 200
        os.kill(engine, signal.SIGCONT)
        assert server.output().count("error: no engine progress for") == 1
    finally:
        _resume(engine)
        server.stop()
