"""Server limits (issue 23), on one real server started as a new user would: `lamina serve
HF_DIR --port N` (the Hugging Face directory converted at start-up, into $LAMINA_CACHE_DIR).
A body past `server.max_body_mb` is a 413 with an OpenAI error body, also when chunked;
a connection that sends its headers slowly is closed (`server.header_timeout_s`); prompt
text, stop token ids and batch lines have limits; /v1/models says what one request can
reach (the KV cache, not the model's context); and when rank 0 dies an open stream gets
an error event before [DONE]. The last test kills the server."""

from __future__ import annotations

import json
import os
import signal
import socket

import httpx
import pytest
from server_proc import ServerProcess, child_pids
from spawn_ranks import free_port
from tiny_models import save_tiny_llama

from megatron_lamina.requests.request_schema import MAX_PROMPT_CHARS
from megatron_lamina.requests.sampling_rules import MAX_STOP_TOKEN_IDS


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("limits")
    hf_dir = save_tiny_llama(base / "tiny-hf", tied=False)
    port = free_port()
    job = ServerProcess(None, port, 0, base / "server.log", env={"LAMINA_CACHE_DIR": str(base / "cache")},
                        argv=[str(hf_dir), "--port", str(port), "--set", "kv_cache.num_blocks=8",
                              "--set", "kv_cache.block_size=4", "--set", "server.max_body_mb=2",
                              "--set", "server.header_timeout_s=2"])
    try:
        yield job.wait_healthy(timeout=300).url, job.proc, job.log_path
    finally:
        job.stop()


def test_the_hf_directory_was_converted_and_is_served_under_its_name(server):
    url, _, log_path = server
    assert "lamina: converting" in log_path.read_text()
    [card] = httpx.get(f"{url}/v1/models").json()["data"]
    assert card["id"] == "tiny-hf"
    assert card["max_model_len"] == 32  # 8 blocks of 4 tokens, not the model's 256


def too_large(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and "server.max_body_mb" in error["message"]


def test_a_body_past_max_body_mb_is_a_413(server):
    url = server[0]
    big = json.dumps({"prompt": "w5 " * (1 << 20), "max_tokens": 1}).encode()  # 3 MiB
    too_large(httpx.post(f"{url}/v1/completions", content=big, headers={"content-type": "application/json"}))

    def chunks():  # no content-length: the server must count and stop reading
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"w5 " * (1 << 14)
        yield b'", "max_tokens": 1}'

    too_large(httpx.post(f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"}))
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "w5 w9", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200, ok.text


def test_slow_headers_are_closed(server):
    url = server[0]
    host, port = url.removeprefix("http://").split(":")
    sockets = []
    for _ in range(20):
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        s.settimeout(120)
        sockets.append(s)
    for s in sockets:  # closed by the server: recv sees the end (before: it waited forever)
        assert s.recv(1024) == b""
        s.close()
    assert httpx.get(f"{url}/health").status_code == 200


def test_prompt_text_and_stop_token_ids_are_limited(server):
    url = server[0]
    long = httpx.post(f"{url}/v1/completions", json={"prompt": "a" * (MAX_PROMPT_CHARS + 1), "max_tokens": 1})
    assert long.status_code == 400 and long.json()["error"]["param"] == "prompt", long.text
    chat = httpx.post(f"{url}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "a" * (MAX_PROMPT_CHARS + 1)}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages", chat.text
    stops = httpx.post(f"{url}/v1/completions", json={"prompt": "w5", "max_tokens": 1,
                                                      "stop_token_ids": [3] * (MAX_STOP_TOKEN_IDS + 1)})
    assert stops.status_code == 400 and stops.json()["error"]["param"] == "stop_token_ids", stops.text


def test_rank_0_dying_gives_open_streams_an_error_event(server):
    url, proc, _ = server
    [rank0] = child_pids(proc.pid)  # one rank (colocated); the front end is its child
    os.kill(rank0, signal.SIGSTOP)  # the engine takes the request and makes no step
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"prompt": "w5 w9", "max_tokens": 8, "stream": True}) as response:
        assert response.status_code == 200
        os.kill(rank0, signal.SIGKILL)
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["type"] == "server_error"


def test_a_batch_line_past_the_limit_is_an_error_record(tmp_path):
    from megatron_lamina.batch.batch_job import read_batch

    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "w5"}) + "\n" + json.dumps({"id": "b", "prompt": "w5 " * 100}) + "\n")
    ok, long = read_batch(path, max_line_bytes=200)
    assert ok.error is None and long.item is None and "line 2: " in long.error and "server.max_body_mb" in long.error
