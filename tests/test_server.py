"""The OpenAI-compatible server, for real: torchrun, 3 ranks (1 model worker, 2 attention
workers, 2 micro-batches), HTTP on 127.0.0.1, the tiny model against `transformers`.

Concurrent requests of different lengths, arriving at different times, streaming or not,
greedy or seeded, must carry exactly the tokens of the reference; bad input gets a 400 that
names the field and the server goes on serving; a client that disconnects frees its blocks.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
from conftest import API_KEY
from tiny_models import make_tokenizer, reference_generate

from megatron_lamina.requests.sampling_params import SamplingParams

pytestmark = pytest.mark.xdist_group("tiny_server")  # the `tiny_server` session fixture: built once, on one worker (conftest)


AUTH = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tiny_server):
    """The session's shared server (conftest.py); its API key goes with every request here."""
    return tiny_server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


CASES = [  # (prompt words, max_tokens, sampling, stream, delay before sending)
    ("w5 w9 w14 w3", 6, {"temperature": 0}, False, 0.0),
    ("w40 w41 w42 w43 w44 w45 w46 w47 w48 w49 w50 w51 w52 w53 w54 w55 w56 w57 w58 w59", 9, {"temperature": 0}, True, 0.1),
    ("w77", 12, {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 11}, True, 0.0),
    ("w8 w100 w200", 7, {"temperature": 0.9, "seed": 12}, False, 0.3),
    ("w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3 w3", 5, {"temperature": 0}, False, 0.2),
    ("w77", 12, {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 11}, False, 0.5),
    ("w9 w8 w7", 10, {"temperature": 0.7, "top_k": 5, "seed": 13}, True, 0.4),
]


async def _send(client, url, prompt, max_tokens, sampling, stream, delay):
    await asyncio.sleep(delay)
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "return_token_ids": True,
            "stream": stream, **sampling}
    if not stream:
        r = await client.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["token_ids"], choice["text"], choice["finish_reason"], r.json()["usage"]
    tokens, text, reason, done = [], [], None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done += 1
            elif line.startswith("data: "):
                choice = json.loads(line[6:])["choices"][0]
                tokens += choice["token_ids"]
                text.append(choice["text"])
                reason = choice["finish_reason"] or reason
    assert done == 1
    return tokens, "".join(text), reason, None


def test_concurrent_requests_match_the_reference(server, http, tiny_models):
    # The shared server's prefix cache may hold these prompts' first blocks from earlier tests:
    # forgotten, so that the usage below counts no cached token.
    assert http.post("/reset_prefix_cache").status_code == 200

    async def main():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
            return await asyncio.gather(*(_send(client, server.url, *case) for case in CASES))

    results = asyncio.run(main())
    tok = make_tokenizer()
    prompts = [tok(case[0])["input_ids"] for case in CASES]
    params = [SamplingParams(max_tokens=c[1], **c[2]) for c in CASES]
    expected, _ = reference_generate(tiny_models["untied"].hf_dir, prompts, params)
    for case, prompt, want, (tokens, text, reason, usage) in zip(CASES, prompts, expected, results):
        assert tokens == want, case
        assert text == tok.decode(want, skip_special_tokens=True)
        assert reason == "length"
        if usage is not None:
            assert usage == {"prompt_tokens": len(prompt), "completion_tokens": len(want),
                             "total_tokens": len(prompt) + len(want),
                             "prompt_tokens_details": {"cached_tokens": 0}}  # no two prompts share a block
    assert results[2][:3] == results[5][:3]  # same seed, streamed and not


def test_chat_completion_and_streaming_agree(http):
    body = {"messages": [{"role": "user", "content": "w5 w9"}], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}
    plain = http.post("/v1/chat/completions", json=body, timeout=60).json()
    assert plain["object"] == "chat.completion"
    content = plain["choices"][0]["message"]["content"]
    pieces, usage = [], None
    with http.stream("POST", "/v1/chat/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert chunk["object"] == "chat.completion.chunk"
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    pieces.append(choice["delta"].get("content", ""))
    assert "".join(pieces) == content and content
    assert usage == plain["usage"]


@pytest.mark.parametrize("body, param", [
    ('{"prompt": "w5", "max_tokens": 3', None),                       # malformed JSON
    ({"prompt": "w5", "colour": "red"}, "colour"),                     # unknown field
    ({"prompt": 5}, "prompt"),                                         # wrong type
    ({"prompt": "w5", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "w5", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "w5", "max_tokens": 10**9}, "max_tokens"),             # beyond the context
    ({"prompt": "w5", "temperature": 3.5}, "temperature"),
    ({"prompt": "w5", "top_p": 0}, "top_p"),
    ({"prompt": "w5", "top_p": 1.5}, "top_p"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": " ".join(["w3"] * 400)}, "prompt"),                    # longer than the context
    ({"prompt": "w5", "n": 17}, "n"),
    ({"prompt": "w5", "response_format": {"type": "json_schema"}}, "response_format"),  # no schema
    ({"prompt": "w5", "stop": [""]}, "stop"),
    ({"messages": []}, "messages"),
    ({"prompt": "w5 \ud800"}, "prompt"),                              # not valid Unicode: a lone surrogate
    ({"messages": [{"role": "user", "content": "\udc00"}]}, "messages"),
    ({"prompt": "w5", "model": "\ud800"}, "model"),
    ({"prompt": "w5", "seed": 2**64}, "seed"),                          # beyond torch.Generator's seeds
    ({"prompt": "w5", "seed": -2**63 - 1}, "seed"),
    ({"prompt": [True, False]}, "prompt"),                             # booleans are no token ids
    ({"prompt": "w5", "temperature": True}, "temperature"),
])
def test_bad_input_gets_400_and_serving_goes_on(http, body, param):
    url = f"/v1/{'chat/' if 'messages' in body else ''}completions"
    content = body if isinstance(body, str) else json.dumps(body)  # \u escapes: lone surrogates travel as JSON allows
    r = http.post(url, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    ok = http.post("/v1/completions", json={"prompt": "w5", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_unknown_model_is_404(http):
    r = http.post("/v1/completions", json={"prompt": "w5", "model": "gpt-9"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def _openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def test_http_errors_are_openai_bodies_and_models_by_id(http, tiny_models):
    name = tiny_models["untied"].canonical_dir.name
    assert "GET /v1/nope" in _openai_error(http.get("/v1/nope"), 404)["message"]
    assert _openai_error(http.delete("/health"), 405)["code"] == "method_not_allowed"
    assert "use POST" in _openai_error(http.get("/v1/completions"), 405)["message"]
    body = json.dumps({"prompt": "w5", "max_tokens": 2})
    plain = http.post("/v1/completions", content=body, headers={"content-type": "text/plain"})
    assert "content-type: application/json" in _openai_error(plain, 415)["message"]
    bare = http.post("/v1/completions", content=body)  # no content-type header
    assert bare.status_code == 200 and bare.json()["usage"]["completion_tokens"] == 2  # no header: read as JSON
    card = http.get(f"/v1/models/{name}").json()
    assert card == http.get("/v1/models").json()["data"][0] and card["id"] == name
    assert _openai_error(http.get("/v1/models/org/gpt-9"), 404)["code"] == "model_not_found"


def test_extreme_sampling_values_are_greedy(http):
    """A temperature or top_p that underflows float32 samples the argmax (their limit), never token 0."""
    def tokens(**sampling):
        body = {"prompt": "w5 w9 w14", "max_tokens": 6, "ignore_eos": True, "return_token_ids": True, **sampling}
        r = http.post("/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    greedy = tokens(temperature=0)
    assert len(set(greedy)) > 1
    assert tokens(temperature=1e-39, seed=1) == greedy
    assert tokens(temperature=1.0, top_p=1e-46, seed=2) == greedy


def test_models_health_metrics(http, tiny_models):
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [tiny_models["untied"].canonical_dir.name]
    assert http.get("/health").json()["status"] == "ok"
    text = http.get("/metrics").text
    for name in ("lamina_requests_running", "lamina_requests_waiting", 'lamina_kv_blocks_used{shard="1"}',
                 "lamina_prompt_tokens_total", "lamina_generation_tokens_total",
                 "lamina_time_to_first_token_seconds_bucket", "lamina_inter_token_latency_seconds_bucket"):
        assert name in text, name


def _metric(server, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            yield float(line.rsplit(" ", 1)[1])


def test_client_disconnect_cancels_and_frees_blocks(server, http):
    before = next(_metric(server, "lamina_generation_tokens_total"))
    body = {"prompt": "w5 w6 w7", "max_tokens": 250, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, timeout=60) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: {")
            if chunks == 3:
                break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum(_metric(server, "lamina_requests_running")) > 0:
        time.sleep(0.05)
    assert sum(_metric(server, "lamina_requests_running")) == 0
    assert sum(_metric(server, "lamina_kv_blocks_used")) == 0
    generated = next(_metric(server, "lamina_generation_tokens_total"))
    assert 3 <= generated - before < 250  # cancelled: it did not run to max_tokens
    time.sleep(0.5)
    assert next(_metric(server, "lamina_generation_tokens_total")) == generated  # nothing runs on


def test_load_tool_loses_and_duplicates_nothing(server):
    """tools/load_test.py: 300 concurrent streaming requests, every one accounted for."""
    import subprocess
    import sys

    from torchrun import ROOT

    result = subprocess.run([sys.executable, str(ROOT / "tools" / "load_test.py"), "--url", server.url,
                             "--api-key", API_KEY, "--requests", "300", "--concurrency", "300", "--max-tokens", "4", "--timeout", "240"],
                            capture_output=True, text=True, timeout=300)
    summary = json.loads(result.stdout)
    assert result.returncode == 0, summary
    assert summary["completed"] == 300 and summary["duplicated_ids"] == 0 and summary["generated_tokens"] == 1200


# ---------------------------------------------------------------------------------- fuzzing

FUZZ_VALUES = [None, True, False, 0, -1, 1, 3, 2**63, 2**64, -2**63 - 1, 10**30, 1e308, -0.0, 1e-320, 1e-45, 0.5, 2.5,
               "", "w5", "\ud800", "w\udfff\ud800", "x" * 3000, [], [True], [1, 2], [-1], [10**9], [2**64], ["w5"],
               ["w5", "w6"], [""], {}, {"a": 1}, {"\ud800": 1}, [[1]], "NaN", {"include_usage": "yes"}]
FUZZ_MESSAGES = [[{"role": "user", "content": "\ud800"}], [{"role": True, "content": "w5"}], [{"role": "user"}],
                 [{"role": "user", "content": [{"type": "text", "text": "\udbff"}]}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                 [{"role": "user", "content": "w5", "name": "\ud800"}], [{"role": "user", "content": "w5"}] * 3]
FUZZ_FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
               "stop", "stream", "stream_options", "n", "user", "model", "logit_bias", "ignore_eos", "min_tokens",
               "return_token_ids", "logprobs", "echo", "presence_penalty", "best_of", "\ud800", "colour"]


def hostile_requests(rng: random.Random, count: int):
    """(route, body bytes, content-type) of requests built to break the server: valid bodies with 1-3
    fields (0-3) set to hostile values, then some cut short, made invalid UTF-8, nested deeply, or not objects."""
    for _ in range(count):
        chat = rng.random() < 0.5
        body = {"messages": [{"role": "user", "content": "w5 w9"}]} if chat else {"prompt": "w5 w9"}
        body.update(max_tokens=2, stream=rng.random() < 0.3)
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            field = rng.choice(FUZZ_FIELDS)
            body[field] = rng.choice(FUZZ_MESSAGES if field == "messages" and rng.random() < 0.7 else FUZZ_VALUES)
        raw = json.dumps(body).encode()
        damage = rng.random()
        if damage < 0.08:
            raw = raw[: rng.randrange(len(raw))]
        elif damage < 0.14:
            raw = raw.replace(b'"w5', b'"\xe9\xff\xc0', 1)
        elif damage < 0.18:
            raw = b"[" * rng.choice([1, 50, 5000, 200_000])
        elif damage < 0.22:
            raw = json.dumps(rng.choice(FUZZ_VALUES)).encode()
        elif damage < 0.26:
            raw = raw[:-1] + rng.choice([b', "temperature": NaN}', b', "top_p": -Infinity}', b', "seed": 1e999}'])
        content_type = rng.choice(["application/json"] * 6 + [None, "text/plain", "application/json; charset=latin-1"])
        yield ("/v1/chat/completions" if chat else "/v1/completions"), raw, content_type


def test_fuzzed_bodies_never_get_a_5xx(server, http):
    """Both completion routes, 200 hostile bodies (fixed seed): every answer is a 200 or a 4xx with an
    OpenAI error body, never a 5xx; afterwards the server is healthy and holds no KV block."""
    statuses = []
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        for route, raw, content_type in hostile_requests(random.Random(13), 200):
            headers = {"content-type": content_type} if content_type else {}
            with client.stream("POST", route, content=raw, headers=headers) as r:
                text = "".join(r.iter_text())
            statuses.append(r.status_code)
            assert r.status_code < 500, (route, raw[:300], text[:500])
            if r.status_code != 200:
                assert 400 <= r.status_code < 500 and json.loads(text)["error"]["message"], text[:500]
            elif r.headers["content-type"].startswith("text/event-stream"):
                assert text.rstrip().endswith("data: [DONE]"), text[-300:]
            else:
                assert json.loads(text)["choices"], text[:500]
    assert statuses.count(200) >= 20 and sum(400 <= s < 500 for s in statuses) >= 100, statuses
    assert http.get("/health").status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(_metric(server, "lamina_kv_blocks_used")) > 0:
        time.sleep(0.05)
    assert sum(_metric(server, "lamina_kv_blocks_used")) == 0
    assert sum(_metric(server, "lamina_requests_running")) == 0
