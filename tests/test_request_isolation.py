"""One request's failure is its own (issue 23), in a real server (torchrun, 1 model worker and
1 attention worker) and a real batch job (`lamina generate`), on the tiny model:

* messages the checkpoint's chat template refuses (a Llama-2 style template that raises
  "Conversation roles must alternate", a jinja2 TemplateError): a 400 naming `messages` from
  the chat route and /tokenize, an error record in the batch job, also under --resume;
* a detokenizer that raises on one token (the `tokenizers` library's `DecodeStream.step`
  raising "Invalid prefix encountered", injected by tests/faults/sitecustomize.py into the
  job's processes) and an exception in `LLMEngine._append_token` for one token (the same
  way): the request that meets the token ends with an error (503 body, or an error event then
  [DONE]; an error record), while the requests beside it give the reference model's tokens,
  the server stays healthy and serves the next request, and the batch job writes every
  other record.

The faulty requests are steered onto their token with `logit_bias`; the good ones never emit
it (checked on the reference).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest
from server_proc import ServerProcess, tiny_server_config
from tiny_models import make_tokenizer, reference_generate
from torchrun import lamina

from megatron_lamina.requests.sampling_params import SamplingParams

FAULTS = Path(__file__).resolve().parent / "faults"
DETOKENIZE_FAULT, APPEND_FAULT = 250, 251
# The tests' chat template, behind the alternation check of Llama-2's own template.
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w9 {% endif %}")
GOOD_PROMPTS = ["w5 w9 w14 w3", "w40 w41 w42 w43 w44"]
GOOD_CHAT = [{"role": "user", "content": "w40 w41 w42"}]
BAD_CHAT = [{"role": "user", "content": "w1"}, {"role": "user", "content": "w2"}]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_models):
    """A copy of the tiny checkpoint whose chat template raises, and the reference tokens of
    the good prompts and of the good chat."""
    model = tiny_models["untied"]
    checkpoint = tmp_path_factory.mktemp("alternating") / "canonical"
    shutil.copytree(model.canonical_dir, checkpoint)
    (checkpoint / "tokenizer" / "chat_template.jinja").write_text(ALTERNATING_TEMPLATE)
    tok = make_tokenizer()
    prompts = [tok(p)["input_ids"] for p in GOOD_PROMPTS]
    prompts.append(tok(tok.apply_chat_template(GOOD_CHAT, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"])
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    expected, _ = reference_generate(model.hf_dir, prompts, [greedy] * len(prompts))
    assert not {DETOKENIZE_FAULT, APPEND_FAULT} & {t for tokens in expected for t in tokens}
    return checkpoint, expected


@pytest.fixture
def faulty_env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAULTS)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    monkeypatch.setenv("LAMINA_TEST_FAULT", f"detokenize:{DETOKENIZE_FAULT},append:{APPEND_FAULT}")


def _greedy(**fields) -> dict:
    return {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True, **fields}


def _forced(token: int) -> dict:
    return _greedy(prompt="w5 w6", logit_bias={str(token): 100})


def _streamed(url: str, route: str, body: dict) -> list[str]:
    with httpx.stream("POST", f"{url}{route}", json={**body, "stream": True}, timeout=120) as r:
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def _posted(url: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{route}", json=body, timeout=120)


def _streamed_tokens(events: list[str]) -> list[int]:
    assert events[-1] == "[DONE]", events
    return [t for e in events[:-1] for t in json.loads(e)["choices"][0].get("token_ids") or []]


def test_server_fails_the_faulty_request_alone(tmp_path, job, faulty_env):
    checkpoint, expected = job
    config, port = tiny_server_config(tmp_path, checkpoint, parallel={"attention_workers": 1})
    server = ServerProcess(config, port, 2, tmp_path / "server.log").wait_healthy()
    try:
        url = server.url
        calls = {  # all at once, so that the faulty requests share steps with the good ones
            "plain": lambda: _posted(url, "/v1/completions", _greedy(prompt=GOOD_PROMPTS[0])),
            "streamed": lambda: _streamed(url, "/v1/completions", _greedy(prompt=GOOD_PROMPTS[1])),
            "chat": lambda: _posted(url, "/v1/chat/completions", _greedy(messages=GOOD_CHAT)),
            "detokenize": lambda: _posted(url, "/v1/completions", _forced(DETOKENIZE_FAULT)),
            "append": lambda: _streamed(url, "/v1/completions", _forced(APPEND_FAULT)),
            "bad_chat": lambda: _posted(url, "/v1/chat/completions", _greedy(messages=BAD_CHAT)),
            "bad_tokenize": lambda: _posted(url, "/tokenize", {"messages": BAD_CHAT}),
        }
        results: dict = {}
        threads = [threading.Thread(target=lambda k=k, f=f: results.__setitem__(k, f())) for k, f in calls.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)

        # The requests beside the faults: the reference's tokens.
        assert results["plain"].status_code == 200, results["plain"].text
        assert results["plain"].json()["choices"][0]["token_ids"] == expected[0]
        assert _streamed_tokens(results["streamed"]) == expected[1]
        assert results["chat"].status_code == 200, results["chat"].text
        assert results["chat"].json()["choices"][0]["token_ids"] == expected[2]

        # The faulty ones: an error of the server's, naming what failed.
        detokenize = results["detokenize"]
        assert detokenize.status_code == 503, detokenize.text
        assert "internal error while processing this request" in detokenize.json()["error"]["message"]
        assert "Invalid prefix encountered" in detokenize.json()["error"]["message"]
        append = results["append"]
        assert append[-1] == "[DONE]" and append.count("[DONE]") == 1
        assert f"RuntimeError: token {APPEND_FAULT}" in json.loads(append[-2])["error"]["message"]

        # The template's refusal is the input's fault: a 400 naming the field.
        for key in ("bad_chat", "bad_tokenize"):
            response = results[key]
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == "messages" and "Conversation roles must alternate" in error["message"], error

        # The engine lives on.
        assert httpx.get(f"{url}/health").status_code == 200
        again = _posted(url, "/v1/completions", _greedy(prompt=GOOD_PROMPTS[0]))
        assert again.status_code == 200 and again.json()["choices"][0]["token_ids"] == expected[0]
        assert server.proc.poll() is None
        assert server.output().count("the others go on") == 2
    finally:
        server.stop()


def _batch_config(tmp_path: Path, checkpoint: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(f"model:\n  checkpoint: {checkpoint}\nparallel:\n  tensor_parallel: 1\n  attention_workers: 1\n"
                    "  attention_head_groups: 1\nkv_cache:\n  block_size: 4\n  num_blocks: 64\n")
    return path


def test_batch_job_writes_an_error_record_for_the_faulty_line_alone(tmp_path, job, faulty_env):
    checkpoint, expected = job
    lines = [
        {"id": "a", **_greedy(prompt=GOOD_PROMPTS[0])},
        {"id": "bad-chat", **_greedy(messages=BAD_CHAT)},
        {"id": "detokenize", **_forced(DETOKENIZE_FAULT)},
        {"id": "b", **_greedy(prompt=GOOD_PROMPTS[1])},
        {"id": "append", **_forced(APPEND_FAULT)},
        {"id": "chat", **_greedy(messages=GOOD_CHAT)},
    ]
    for line in lines:
        line.pop("return_token_ids")
    job_file = tmp_path / "in.jsonl"
    job_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config, out = _batch_config(tmp_path, checkpoint), tmp_path / "out.jsonl"
    errors = {"bad-chat": "line 2: the model's chat template refused these messages: Conversation roles must alternate",
              "detokenize": "line 3: internal error while processing this request (Exception: Invalid prefix encountered",
              "append": f"line 5: internal error while processing this request (RuntimeError: token {APPEND_FAULT}"}
    good = {"a": expected[0], "b": expected[1], "chat": expected[2]}

    def check(result, skipped: int) -> None:
        assert result.returncode == 1, result.stderr[-3000:]  # some lines failed, none stopped the job
        records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert sorted(records) == sorted(line["id"] for line in lines)  # one record per line
        for key, message in errors.items():
            assert records[key]["finish_reason"] == "error" and records[key]["error"].startswith(message), records[key]
        for key, tokens in good.items():
            assert records[key]["token_ids"] == tokens and records[key]["finish_reason"] == "length", records[key]
        skip = f", {skipped} skipped by --resume (0 of them failed earlier)" if skipped else ""
        assert result.stderr.splitlines()[-1] == f"summary: {3 - skipped} ok, 3 failed{skip}; records in {out}"

    result = lamina("generate", "--config", str(config), "--input", str(job_file), "--output", str(out), "--quiet")
    check(result, skipped=0)
    # An interrupted run that wrote only line 1: --resume runs the rest, the faulty lines included.
    first = next(r for r in out.read_text().splitlines() if json.loads(r)["id"] == "a")
    out.write_text(first + "\n")
    result = lamina("generate", "--config", str(config), "--input", str(job_file), "--output", str(out), "--quiet",
                    "--resume")
    check(result, skipped=1)
