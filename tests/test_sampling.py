"""The sampler against first principles: greedy, top-k, top-p, temperature, seeds; the batched
sampler against the per-row one it replaced (bit-identical on the CPU), seeded rows independent
of their batch-mates, and no host transfer but the final token ids."""

from __future__ import annotations


import pytest
import torch

from megatron_lamina.driver.sampling import sample_tokens
from megatron_lamina.requests.sampling_params import SamplingParams

LOGITS = torch.tensor([1.0, 3.0, 2.5, -1.0, 0.0, 2.9])


def sample_token(logits, params, generator) -> int:
    """One row through the batched sampler."""
    return sample_tokens(logits.unsqueeze(0), [params], [generator])[0]


def draws(params: SamplingParams, n: int = 400) -> set[int]:
    generator = params.make_generator()
    return {sample_token(LOGITS, params, generator) for _ in range(n)}


def test_greedy_is_argmax():
    assert draws(SamplingParams(temperature=0)) == {1}


def test_top_k_keeps_the_k_largest():
    assert draws(SamplingParams(temperature=1.0, top_k=1, seed=0)) == {1}
    assert draws(SamplingParams(temperature=2.0, top_k=3, seed=0)) == {1, 5, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.softmax(LOGITS, -1)  # sorted: 1 (.37), 5 (.33), 2 (.22), ...
    assert probs[1] < 0.5 < probs[1] + probs[5]
    assert draws(SamplingParams(temperature=1.0, top_p=0.5, seed=0)) == {1, 5}
    assert draws(SamplingParams(temperature=1.0, top_p=0.01, seed=0)) == {1}


def test_full_distribution_reaches_every_token():
    assert draws(SamplingParams(temperature=2.0, seed=1), 2000) == set(range(len(LOGITS)))


def test_frequencies_follow_the_softmax():
    params = SamplingParams(temperature=1.0, seed=3)
    generator = params.make_generator()
    counts = torch.bincount(torch.tensor([sample_token(LOGITS, params, generator) for _ in range(4000)]),
                            minlength=len(LOGITS)).float() / 4000
    assert torch.allclose(counts, torch.softmax(LOGITS, -1), atol=0.03)


def test_same_seed_same_tokens():
    a = SamplingParams(temperature=1.0, seed=42)
    ga, gb = a.make_generator(), SamplingParams(temperature=1.0, seed=42).make_generator()
    assert [sample_token(LOGITS, a, ga) for _ in range(50)] == [sample_token(LOGITS, a, gb) for _ in range(50)]


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"stop": [""]}, "stop"),
])
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} = "):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"temperature": 1e-39}, {"temperature": 1e-30}, {"temperature": 5e-6},  # logits / t overflow float32
    {"temperature": 1.0, "top_p": 1e-46}, {"temperature": 1.0, "top_p": 1e-300},  # top_p a float32 zero
])
def test_extreme_values_sample_their_limit_never_an_underflow(kwargs):
    """Tiny temperatures and top_p tend to greedy: the argmax (token 1 here), never the token 0 of an
    all-NaN / all -inf row."""
    assert draws(SamplingParams(seed=0, **kwargs), 50) == {1}


@pytest.mark.parametrize("seed", [-2**63, 2**64 - 1])
def test_seeds_at_the_generator_limits(seed):
    assert SamplingParams(temperature=1.0, seed=seed).make_generator().initial_seed() == seed % 2**64


@pytest.mark.parametrize("kwargs, field", [
    ({"seed": 2**64}, "seed"), ({"seed": -2**63 - 1}, "seed"), ({"seed": True}, "seed"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"temperature": True}, "temperature"), ({"top_p": float("nan")}, "top_p"), ({"max_tokens": True}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
])
def test_values_torch_cannot_take_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} = "):
        SamplingParams(**kwargs)


def per_row_reference(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The per-row sampler `sample_tokens` replaced, verbatim: the CPU numbers must not change."""
    logits = logits.float().cpu()
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


MIXED = [  # greedy, temperature, top-k, top-p, both, repeated parameters with other seeds
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.7, seed=1),
    SamplingParams(temperature=1.0, top_k=5, seed=2),
    SamplingParams(temperature=0, top_k=3, top_p=0.5),
    SamplingParams(temperature=0.9, top_p=0.8, seed=3),
    SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=4),
    SamplingParams(temperature=0.7, seed=5),
    SamplingParams(temperature=1.3, top_k=1, seed=6),
    SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=7),
    SamplingParams(temperature=2.0, top_k=10_000, top_p=0.3, seed=8),
    SamplingParams(temperature=1.0),  # unseeded
]


def mixed_logits(rows: int, vocab: int = 1000, seed: int = 0) -> torch.Tensor:
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    logits[1::3] = logits[1::3].round()  # ties
    return logits.bfloat16()


def test_batched_equals_per_row_reference():
    """Every row with a generator of its own (the unseeded one given one by hand) draws what
    `torch.multinomial` draws with it."""
    logits = mixed_logits(len(MIXED))
    batched = [p.make_generator() or torch.Generator().manual_seed(99) for p in MIXED]
    single, reference = [], []
    for g in batched:  # copies of each generator's state
        single.append(torch.Generator().set_state(g.get_state()))
        reference.append(torch.Generator().set_state(g.get_state()))
    for step in range(20):
        step_logits = logits.roll(step, dims=-1)
        got = sample_tokens(step_logits, MIXED, batched)
        assert got == [sample_token(row, p, g) for row, p, g in zip(step_logits, MIXED, single)]
        assert got == [per_row_reference(row, p, g) for row, p, g in zip(step_logits, MIXED, reference)]


def test_seeded_row_does_not_depend_on_its_batch_mates():
    mine = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=11)
    row = mixed_logits(1, seed=5)[0]

    def tokens(mates: list[SamplingParams], position: int) -> list[int]:
        params = mates[:position] + [mine] + mates[position:]
        logits = mixed_logits(len(params), seed=len(mates))
        logits[position] = row
        generators = [p.make_generator() for p in params]
        return [sample_tokens(logits, params, generators)[position] for _ in range(10)]

    alone = tokens([], 0)
    assert len(set(alone)) > 1
    assert tokens(MIXED, 0) == alone
    assert tokens(MIXED, 5) == alone
    assert tokens(MIXED[::-1], len(MIXED)) == alone
    same = [SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=s) for s in range(4)]
    assert tokens(same, 2) == alone


def test_unseeded_rows_share_one_batched_draw(monkeypatch):
    """Rows without a seed have no generator: their noise is ONE `exponential_` over the batch
    (one launch on a GPU, not one per row), from the default generator, so a fixed global
    seed repeats them; seeded rows still draw their own rows, one call each."""
    unseeded = [SamplingParams(temperature=1.0) for _ in range(64)]
    assert all(p.make_generator() is None for p in unseeded)
    logits = torch.zeros(64, 50)  # uniform: any token is as likely, rows must differ

    def draw(params):
        calls = []
        original = torch.Tensor.exponential_

        def counted(self, *args, **kwargs):
            calls.append(tuple(self.shape))
            return original(self, *args, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "exponential_", counted)
            tokens = sample_tokens(logits[:len(params)], params, [p.make_generator() for p in params])
        return tokens, calls

    torch.manual_seed(0)
    first, calls = draw(unseeded)
    assert calls == [(64, 50)]
    torch.manual_seed(0)
    assert draw(unseeded)[0] == first
    assert len(set(first)) > 10  # rows differ: each row its own noise
    assert draw(unseeded)[0] != first  # and the next step draws anew

    mixed = unseeded[:30] + [SamplingParams(temperature=1.0, seed=s) for s in range(3)] + \
        [SamplingParams(temperature=0)] * 31
    tokens, calls = draw(mixed)
    assert calls == [(64, 50), (50,), (50,), (50,)]
    assert tokens[33:] == [0] * 31  # greedy rows: the argmax of a uniform row
    seeded = [sample_token(logits[0], SamplingParams(temperature=1.0, seed=s),
                           SamplingParams(temperature=1.0, seed=s).make_generator()) for s in range(3)]
    assert tokens[30:33] == seeded
    assert draw(mixed[33:])[1] == []  # all greedy: nothing drawn


def test_logit_bias_rows_sample_with_the_batch():
    """A biased row without a seed takes its noise from the batched draw, and its bias holds."""
    params = [SamplingParams(temperature=1.0, logit_bias={3: 100.0}), SamplingParams(temperature=1.0)]
    logits = torch.zeros(2, 8)
    for _ in range(20):
        assert sample_tokens(logits, params, [None, None])[0] == 3


def test_empty_batch_and_mismatched_lengths():
    assert sample_tokens(torch.empty(0, 7), [], []) == []
    with pytest.raises(ValueError):
        sample_tokens(torch.zeros(2, 7), [SamplingParams()], [torch.Generator()])


HOST_TRANSFERS = ("cpu", "item", "tolist", "numpy", "__int__", "__float__", "__bool__")


def count_host_transfers(monkeypatch) -> dict[str, int]:
    calls = dict.fromkeys(HOST_TRANSFERS, 0)
    for name in HOST_TRANSFERS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_one_host_transfer_per_batch(monkeypatch):
    logits = mixed_logits(len(MIXED))
    generators = [p.make_generator() for p in MIXED]
    calls = count_host_transfers(monkeypatch)
    sample_tokens(logits, MIXED, generators)
    assert calls == {**dict.fromkeys(HOST_TRANSFERS, 0), "tolist": 1}


# ----------------------------------------------------------- penalties, bias, min_p

def _reference_adjusted(logits: list[float], p: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    """The definitions, one token at a time (OpenAI's presence/frequency/logit_bias, HF's repetition)."""
    out = list(logits)
    for t, bias in (p.logit_bias or {}).items():
        out[t] += bias
    for t in range(len(out)):
        if t in prompt or t in output:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        count = output.count(t)
        out[t] -= p.frequency_penalty * count + (p.presence_penalty if count else 0.0)
    return out


def test_penalties_and_bias_against_their_definitions():
    from megatron_lamina.driver.sampling import adjust_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 12, generator=g) * 3
    prompt, output = [1, 4, 4, 7], [4, 9, 9, 9, 2]
    cases = [SamplingParams(presence_penalty=0.7), SamplingParams(frequency_penalty=-0.4),
             SamplingParams(repetition_penalty=1.6), SamplingParams(repetition_penalty=0.5),
             SamplingParams(logit_bias={3: 5.0, 11: -100}),
             SamplingParams(presence_penalty=0.3, frequency_penalty=0.2, repetition_penalty=1.2, logit_bias={0: 2})]
    for p in cases:
        got = adjust_logits(logits, p, (prompt, output))[0].tolist()
        want = _reference_adjusted(logits[0].tolist(), p, prompt, output)
        assert all(abs(a - b) < 1e-5 for a, b in zip(got, want)), (p, got, want)
        # Greedy sampling takes the argmax of the adjusted row, batched with unpenalized rows.
        greedy = SamplingParams(temperature=0, presence_penalty=p.presence_penalty,
                                frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty,
                                logit_bias=p.logit_bias)
        plain = SamplingParams(temperature=0)
        tokens = sample_tokens(torch.cat([logits, logits]), [plain, greedy], [plain.make_generator()] * 2,
                               [None, (prompt, output)])
        assert tokens == [int(logits[0].argmax()), max(range(12), key=lambda t: want[t])]


def test_min_p_keeps_tokens_near_the_most_likely():
    probs = torch.softmax(LOGITS, -1)  # 1: .37, 5: .33, 2: .22, 4: .04, 0: .03, 3: .01
    kept = {t for t in range(6) if probs[t] >= 0.5 * probs.max()}
    assert kept == {1, 5, 2}
    assert draws(SamplingParams(temperature=1.0, min_p=0.5, seed=0), n=600) == kept
    assert draws(SamplingParams(temperature=1.0, min_p=1.0, seed=0)) == {1}
    a = SamplingParams(temperature=1.0, min_p=0.1, seed=4)
    first = [sample_token(LOGITS, a, a.make_generator()) for _ in range(1)]
    assert first == [sample_token(LOGITS, a, a.make_generator())]  # seeded: repeatable


def test_new_fields_are_checked():
    for bad in (dict(min_p=1.5), dict(presence_penalty=3), dict(repetition_penalty=0), dict(logprobs=21),
                dict(prompt_logprobs=-1), dict(logit_bias={"x": 1}), dict(logit_bias={1: 200}),
                dict(stop_token_ids=[-1]), dict(max_tokens=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0  # scoring a prompt


# ------------------------------------------ issue 23: one validator, arithmetic that cannot overflow

RULE_CASES = [  # (field, value, accepted): at and beyond every bound, the verdict written from the documented
    # ranges (README "Request fields"; OpenAI's for temperature, top_p and the penalties, vLLM's for the rest)
    ("temperature", 2.0, True), ("temperature", 2.5, False), ("temperature", 3, False), ("temperature", -0.1, False),
    ("temperature", 1e-40, True), ("top_p", 1.0, True), ("top_p", 0.0, False), ("top_p", 1.01, False),
    ("top_k", -1, True), ("top_k", -2, False), ("min_p", 1.0, True), ("min_p", 1.5, False),
    ("presence_penalty", -2.0, True), ("presence_penalty", 2.1, False), ("frequency_penalty", 2.0, True),
    ("frequency_penalty", -3, False), ("repetition_penalty", 2.0, True), ("repetition_penalty", 2.5, False),
    ("repetition_penalty", 0, False), ("repetition_penalty", 1e-300, True), ("seed", 2**64 - 1, True),
    ("seed", 2**64, False), ("min_tokens", 0, True), ("min_tokens", -1, False), ("stop", ["s"] * 64, True),
    ("stop", ["s"] * 65, False), ("stop", ["s" * 1024], True), ("stop", ["s" * 1025], False), ("stop", [""], False),
    ("stop_token_ids", [0, 5], True), ("stop_token_ids", [-1], False), ("logit_bias", {"5": 100}, True),
    ("logit_bias", {"5": 100.5}, False),
]


@pytest.mark.parametrize("name, value, accepted", RULE_CASES)
def test_sampling_params_and_the_request_schema_share_one_rule(name, value, accepted):
    """`LLM` (SamplingParams) accepts exactly what the server and the batch job accept (the
    schema), and names the same allowed range."""
    import json

    from megatron_lamina.server.protocol import ApiError, CompletionRequest, read_body

    try:
        body = read_body(None, json.dumps({"prompt": "w5", name: value}).encode(), CompletionRequest)
        server_error = None
    except ApiError as e:
        server_error = e.message
    engine_value = {int(k): v for k, v in value.items()} if name == "logit_bias" else value
    try:
        SamplingParams(**{name: engine_value})
        engine_error = None
    except ValueError as e:
        engine_error = str(e)
    assert (server_error is None) == accepted, server_error
    assert (server_error is None) == (engine_error is None), (server_error, engine_error)
    if server_error is not None:
        field, allowed = server_error.split(": ", 1)
        assert field == name and engine_error.startswith(f"{name} = ") and engine_error.endswith(f": {allowed}")
    else:
        assert body.sampling_params(4) == SamplingParams(max_tokens=4, **{name: engine_value})


HOT = torch.tensor([[40.0, 60.0, 50.0, -30.0, 0.0, 55.0]])  # logits that overflow float32 when divided by 1e-37


@pytest.mark.parametrize("penalty", [1e-37, 1e-38, 1e-45, 1e-300])
@pytest.mark.parametrize("temperature", [1e-5, 0.7, 2.0])
def test_tiny_repetition_penalty_samples_its_limit_never_nan(penalty, temperature):
    """A repetition_penalty near zero divides the seen tokens' positive logits by it: the limit
    is the seen token with the largest logit (2 here, seen in the prompt), never the token 0
    of an all-NaN row."""
    from megatron_lamina.driver.sampling import adjust_logits

    params = SamplingParams(temperature=temperature, repetition_penalty=penalty, seed=0)
    history = ([2, 3], [4])
    adjusted = adjust_logits(HOT, params, history)
    assert torch.isfinite(adjusted).all() and torch.isfinite(adjusted / temperature).all()
    generator = params.make_generator()
    assert {sample_tokens(HOT, [params], [generator], [history])[0] for _ in range(50)} == {2}


def test_extreme_logits_stay_finite_after_the_penalties():
    """Whatever a penalty or bias does to a logit, the row stays finite at the smallest
    temperature that is not greedy: its softmax is a distribution."""
    from megatron_lamina.driver.sampling import SAFE_LOGIT, _probabilities, adjust_logits

    big = torch.tensor([[3e38, -3e38, 1e30, 0.0]])
    params = SamplingParams(temperature=SamplingParams.GREEDY_BELOW, repetition_penalty=1e-6, presence_penalty=2,
                            logit_bias={1: -100.0, 2: 100.0})
    adjusted = adjust_logits(big, params, ([0, 1, 2], [1]))
    assert adjusted.abs().max() <= SAFE_LOGIT
    probs = _probabilities(adjusted, params.temperature, -1, 1.0)
    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-6
