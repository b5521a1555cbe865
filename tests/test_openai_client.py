"""The new fields of the API through the official `openai` client, against a real server (issue 15).

The session's shared server (conftest.tiny_server): torchrun, 3 ranks (1 model worker, 2
attention workers), the tiny model, an API key and a CORS origin. Log-probabilities (completions with echo, chat; streamed and not) equal
log_softmax of transformers' logits; `n` samples and several prompts per request come back
indexed prompt-major, each sample the reference's draw with seed `seed + i`, repeatable; the
penalties, logit_bias and min_p give the tokens of a float32 reference of their definitions
on transformers' logits; stop_token_ids end a request; the API key, CORS, X-Request-Id, the
access log, /tokenize, /detokenize and /version; the prefix cache's usage field, salt,
metrics and reset.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from conftest import API_KEY, ORIGIN
from tiny_models import continue_with as _continue, make_tokenizer, penalized as _penalized

pytestmark = pytest.mark.xdist_group("tiny_server")  # the `tiny_server` session fixture: built once, on one worker (conftest)


@pytest.fixture(scope="module")
def server(tiny_server):
    """The session's shared server (conftest.py), whose API key and CORS origin are checked here."""
    return tiny_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key=API_KEY, base_url=f"{server.url}/v1", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(tiny_models):
    return tiny_models["untied"].canonical_dir.name


@pytest.fixture(scope="module")
def hf(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["untied"].hf_dir, dtype=torch.float32).eval()


def _log_softmax(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


def _ids(text: str) -> list[int]:
    return make_tokenizer()(text)["input_ids"]


def _token_text(token: int) -> str:
    return make_tokenizer().decode([token])


# ------------------------------------------------------------------------- log-probabilities

def test_completion_logprobs_with_echo_streamed_and_not(client, model_name, hf):
    prompt = _ids("w5 w9 w14 w3 w40")
    body = dict(model=model_name, prompt=[prompt], max_tokens=4, temperature=0, logprobs=2, echo=True,
                extra_body={"ignore_eos": True, "return_token_ids": True})
    plain = client.completions.create(**body)
    [choice] = plain.choices
    generated = choice.token_ids
    ids = prompt + generated
    ref = _log_softmax(hf, ids)
    lp = choice.logprobs
    assert lp.tokens == [_token_text(t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i - 1, ids[i]].item()) < 1e-4, i
        top = ref[i - 1].topk(2)
        want = {_token_text(t): v for t, v in zip(top.indices.tolist(), top.values.tolist())}
        want[_token_text(ids[i])] = ref[i - 1, ids[i]].item()  # the token itself is always there
        assert lp.top_logprobs[i].keys() == want.keys()
        assert all(abs(lp.top_logprobs[i][k] - v) < 1e-4 for k, v in want.items())
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    tok = make_tokenizer()
    assert choice.text == tok.decode(prompt) + tok.decode(generated, skip_special_tokens=True,
                                                          clean_up_tokenization_spaces=False)
    assert all(generated[j] == int(ref[len(prompt) - 1 + j].argmax()) for j in range(4))  # greedy

    chunks = list(client.completions.create(**body, stream=True))
    streamed = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in streamed) == choice.text
    assert sum((c.logprobs.token_logprobs for c in streamed), []) == lp.token_logprobs
    assert sum((c.logprobs.text_offset for c in streamed), []) == lp.text_offset
    assert streamed[-1].finish_reason == "length"


def test_scoring_a_prompt_with_max_tokens_0(client, model_name, hf):
    """What lm-eval's log-likelihood requests need: the prompt's log-probabilities, nothing generated."""
    prompts = [_ids("w7 w8 w9 w10"), _ids("w200 w3")]
    out = client.completions.create(model=model_name, prompt=prompts, max_tokens=0, echo=True, logprobs=0)
    assert [c.index for c in out.choices] == [0, 1]
    for prompt, choice in zip(prompts, out.choices):
        ref = _log_softmax(hf, prompt)
        assert choice.finish_reason == "length" and len(choice.logprobs.tokens) == len(prompt)
        assert [round(x, 4) for x in choice.logprobs.token_logprobs[1:]] == \
            [round(ref[i - 1, prompt[i]].item(), 4) for i in range(1, len(prompt))]
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == sum(map(len, prompts))


def test_chat_logprobs_streamed_and_not(server, client, model_name, hf):
    messages = [{"role": "user", "content": "w5 w9 w11"}]
    body = dict(model=model_name, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
                extra_body={"ignore_eos": True, "return_token_ids": True})
    plain = client.chat.completions.create(**body)
    content, generated = plain.choices[0].logprobs.content, plain.choices[0].token_ids
    prompt = httpx.post(f"{server.url}/tokenize", json={"messages": messages},
                        headers={"authorization": f"Bearer {API_KEY}"}).json()["tokens"]
    ref = _log_softmax(hf, prompt + generated)
    assert len(content) == 5
    for j, entry in enumerate(content):
        row = ref[len(prompt) - 1 + j]
        assert generated[j] == int(row.argmax()) and entry.token == _token_text(generated[j])
        assert abs(entry.logprob - row[generated[j]].item()) < 1e-4
        assert entry.bytes == list(entry.token.encode())
        top = row.topk(3)
        assert [t.token for t in entry.top_logprobs] == [_token_text(t) for t in top.indices.tolist()]
        assert all(abs(t.logprob - v) < 1e-4 for t, v in zip(entry.top_logprobs, top.values.tolist()))
    # A salt of its own: from the prefix cache, the plain request's prompt would come with
    # logits of other matrix shapes (equal to about 1e-6, not to the bit).
    salted = {**body, "extra_body": {**body["extra_body"], "cache_salt": "streamed"}}
    streamed = [c.choices[0] for c in client.chat.completions.create(**salted, stream=True) if c.choices]
    pieces = sum((c.logprobs.content for c in streamed if c.logprobs), [])
    assert [(p.token, p.logprob) for p in pieces] == [(c.token, c.logprob) for c in content]
    assert "".join(c.delta.content or "" for c in streamed) == plain.choices[0].message.content


# ---------------------------------------------------------------- n samples, several prompts

def _sampled(row, generator, temperature, min_p=0.0) -> int:
    """The sampling definition: softmax(logits / T), tokens below min_p x the top one's
    probability dropped, one draw with the request's generator."""
    probs = torch.softmax(row / temperature, -1)
    if min_p:
        probs = torch.where(probs < min_p * probs.max(), torch.zeros_like(probs), probs)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def test_n_samples_of_several_prompts_are_seeded_and_indexed(client, model_name, hf):
    prompts = ["w5 w9", "w77 w3 w8"]
    body = dict(model=model_name, prompt=prompts, n=3, max_tokens=6, temperature=0.9, seed=11,
                extra_body={"ignore_eos": True, "return_token_ids": True})
    out = client.completions.create(**body)
    assert [c.index for c in out.choices] == list(range(6))
    tokens = {c.index: c.token_ids for c in out.choices}
    for index in range(6):  # index = prompt * n + sample; sample i drawn with seed + i
        prompt, sample = _ids(prompts[index // 3]), index % 3
        generator = torch.Generator().manual_seed(11 + sample)
        want = _continue(hf, prompt, 6, lambda row, p, o: _sampled(row, generator, 0.9))
        assert tokens[index] == want, index
    assert len({tuple(tokens[i]) for i in range(3)}) == 3  # independent samples
    again = client.completions.create(**body)
    assert {c.index: c.token_ids for c in again.choices} == tokens  # seeded: repeatable
    assert out.usage.prompt_tokens == sum(len(_ids(p)) for p in prompts) and out.usage.completion_tokens == 36

    streamed: dict[int, list[int]] = {}
    finished = set()
    for chunk in client.completions.create(**body, stream=True):
        for c in chunk.choices:
            streamed.setdefault(c.index, []).extend(c.token_ids)
            if c.finish_reason:
                finished.add(c.index)
    assert streamed == tokens and finished == set(range(6))


def test_token_id_prompts_as_a_list_of_lists(client, model_name, hf):
    prompts = [_ids("w10 w11 w12"), _ids("w4")]
    out = client.completions.create(model=model_name, prompt=prompts, max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    for prompt, choice in zip(prompts, out.choices):
        assert choice.token_ids == _continue(hf, prompt, 4, lambda row, p, o: int(row.argmax()))
    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "w5"}], n=2,
                                         max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: n equal samples
    with pytest.raises(openai.BadRequestError, match="65 prompts x n = 16 are 1040 choices"):  # never admissible
        client.completions.create(model=model_name, prompt=["w5"] * 65, n=16, max_tokens=1)


# -------------------------------------------------------------- penalties, bias, min_p, stops

def test_penalties_and_logit_bias_follow_their_definitions(client, model_name, hf):
    prompt = _ids("w5 w9 w5 w9 w5")
    greedy = _continue(hf, prompt, 8, lambda row, p, o: int(row.argmax()))
    fields = {"presence_penalty": 0.6, "frequency_penalty": 0.4, "repetition_penalty": 1.8}
    bias = {greedy[0]: -100.0, 7: 3.0}
    want = _continue(hf, prompt, 8, lambda row, p, o: int(_penalized(row, p, o, fields["presence_penalty"],
                                                                      fields["frequency_penalty"],
                                                                      fields["repetition_penalty"], bias).argmax()))
    out = client.completions.create(model=model_name, prompt=[prompt], max_tokens=8, temperature=0,
                                    logit_bias={str(t): v for t, v in bias.items()},
                                    presence_penalty=fields["presence_penalty"],
                                    frequency_penalty=fields["frequency_penalty"],
                                    extra_body={"repetition_penalty": fields["repetition_penalty"], "ignore_eos": True,
                                                "return_token_ids": True})
    assert out.choices[0].token_ids == want and want != greedy
    biased = client.completions.create(model=model_name, prompt=[prompt], max_tokens=1, temperature=0,
                                       logit_bias={str(greedy[0]): -100},
                                       extra_body={"return_token_ids": True})
    assert biased.choices[0].token_ids[0] != greedy[0]  # the greedy token banned: another one comes


def test_min_p_follows_its_definition(client, model_name, hf):
    prompt = _ids("w31 w32")
    out = client.completions.create(model=model_name, prompt=[prompt], max_tokens=8, temperature=1.0, seed=5,
                                    extra_body={"min_p": 0.3, "ignore_eos": True, "return_token_ids": True})
    generator = torch.Generator().manual_seed(5)
    want = _continue(hf, prompt, 8, lambda row, p, o: _sampled(row, generator, 1.0, min_p=0.3))
    assert out.choices[0].token_ids == want
    generator = torch.Generator().manual_seed(5)
    assert want != _continue(hf, prompt, 8, lambda row, p, o: _sampled(row, generator, 1.0))  # min_p did cut


def test_stop_token_ids_end_the_request(client, model_name, hf):
    prompt = _ids("w12 w13")
    greedy = _continue(hf, prompt, 6, lambda row, p, o: int(row.argmax()))
    out = client.completions.create(model=model_name, prompt=[prompt], max_tokens=6, temperature=0,
                                    extra_body={"stop_token_ids": [greedy[2]], "ignore_eos": True,
                                                "return_token_ids": True})
    stop_at = greedy.index(greedy[2])
    assert out.choices[0].finish_reason == "stop" and out.choices[0].token_ids == greedy[:stop_at + 1]


# ------------------------------------------------------------------------------ operations

def test_api_key_is_required_except_for_health_and_metrics(server, model_name):
    wrong = openai.OpenAI(api_key="wrong", base_url=f"{server.url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model=model_name, prompt="w5", max_tokens=1)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "w5"}).status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_prefix_cache_usage_salt_metrics_and_reset(server, client, model_name):
    """A prompt sent again is served from the prefix cache: usage.prompt_tokens_details
    reports its cached tokens (whole blocks of 4, its last token computed) and the output is
    the first one's; another cache_salt shares nothing; /metrics counts every lookup and the
    hit; POST /reset_prefix_cache (behind the API key) forgets every prefix; an empty salt is
    a 400 naming the field."""
    prompt = " ".join(f"w{i}" for i in range(60, 78))
    n = len(_ids(prompt))

    def run(salt: str):
        out = client.completions.create(model=model_name, prompt=prompt, max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True, "cache_salt": salt})
        assert out.usage.prompt_tokens == n
        return out.choices[0].text, out.usage.prompt_tokens_details.cached_tokens

    def counters():
        text = httpx.get(f"{server.url}/metrics").text
        return [next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))
                for name in ("lamina_prefix_cache_queries_total ", 'lamina_prefix_cache_hits_total{tier="device"} ')]

    queries, hits = counters()
    first = run("prefix-test")  # a salt nobody used before: nothing cached
    again = run("prefix-test")
    other = run("prefix-test-other")
    assert first[1] == 0 and other[1] == 0 and again == (first[0], (n - 1) // 4 * 4)
    assert other[0] == first[0]
    assert counters() == [queries + 3 * n, hits + (n - 1) // 4 * 4]
    assert httpx.post(f"{server.url}/reset_prefix_cache").status_code == 401
    reset = httpx.post(f"{server.url}/reset_prefix_cache", headers={"authorization": f"Bearer {API_KEY}"})
    assert reset.status_code == 200 and reset.json()["blocks_forgotten"] >= 2 * ((n - 1) // 4)
    assert run("prefix-test") == (first[0], 0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name, prompt="w5", max_tokens=1, extra_body={"cache_salt": ""})
    assert e.value.body["param"] == "cache_salt"


def test_cors_request_id_and_access_log(server, client, model_name):
    preflight = httpx.options(f"{server.url}/v1/completions", headers={
        "origin": ORIGIN, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{server.url}/v1/completions", headers={
        "origin": "https://elsewhere.example", "access-control-request-method": "POST"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    raw = client.completions.with_raw_response.create(model=model_name, prompt="w5 w6", max_tokens=3,
                                                      extra_headers={"X-Request-Id": "trace-42"},
                                                      extra_body={"ignore_eos": True})
    assert raw.headers["x-request-id"] == "trace-42" and raw.parse().id == "cmpl-trace-42"
    made = client.models.with_raw_response.list()
    assert len(made.headers["x-request-id"]) == 32  # made when not given
    lines = [line for line in server.output().splitlines() if "request_id=trace-42" in line]
    assert len(lines) == 1 and '"POST /v1/completions" 200 prompt_tokens=3 completion_tokens=3' in lines[0], lines


def test_tokenize_detokenize_version(server, model_name):
    base = openai.OpenAI(api_key=API_KEY, base_url=server.url, max_retries=0)
    tokens = base.post("/tokenize", body={"prompt": "w5 w9"}, cast_to=object)
    assert tokens["tokens"] == _ids("w5 w9") and tokens["count"] == 3 and tokens["max_model_len"] == 256
    bare = base.post("/tokenize", body={"prompt": "w5 w9", "add_special_tokens": False}, cast_to=object)
    assert bare["tokens"] == _ids("w5 w9")[1:]  # without the BOS
    chat = base.post("/tokenize", body={"messages": [{"role": "user", "content": "w5"}]}, cast_to=object)
    assert chat["count"] > 2
    assert base.post("/detokenize", body={"tokens": tokens["tokens"]}, cast_to=object) == \
        {"prompt": make_tokenizer().decode(tokens["tokens"])}
    with pytest.raises(openai.BadRequestError):
        base.post("/detokenize", body={"tokens": [10**6]}, cast_to=object)
    from importlib.metadata import version

    assert base.get("/version", cast_to=object) == {"version": version("megatron-lamina")}


def test_api_key_from_the_config_or_the_environment():
    from megatron_lamina.config import load_config
    from megatron_lamina.server.frontend import server_api_key

    assert server_api_key(load_config(None, ["model.checkpoint=c", "server.api_key=k1"]), {"LAMINA_API_KEY": "k2"}) == "k1"
    assert server_api_key(load_config(None, ["model.checkpoint=c"]), {"LAMINA_API_KEY": "k2"}) == "k2"
    assert server_api_key(load_config(None, ["model.checkpoint=c"]), {"LAMINA_API_KEY": ""}) is None
