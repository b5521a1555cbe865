"""The sampler against first principles: greedy, top-k, top-p, temperature, seeds."""

from __future__ import annotations

import pytest
import torch

from megatron_lamina.engine.sampling import SamplingParams, sample_token

LOGITS = torch.tensor([1.0, 3.0, 2.5, -1.0, 0.0, 2.9])


def draws(params: SamplingParams, n: int = 400) -> set[int]:
    generator = params.make_generator()
    return {sample_token(LOGITS, params, generator) for _ in range(n)}


def test_greedy_is_argmax():
    assert draws(SamplingParams(temperature=0)) == {1}


def test_top_k_keeps_the_k_largest():
    assert draws(SamplingParams(temperature=1.0, top_k=1, seed=0)) == {1}
    assert draws(SamplingParams(temperature=5.0, top_k=3, seed=0)) == {1, 5, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.softmax(LOGITS, -1)  # sorted: 1 (.37), 5 (.33), 2 (.22), ...
    assert probs[1] < 0.5 < probs[1] + probs[5]
    assert draws(SamplingParams(temperature=1.0, top_p=0.5, seed=0)) == {1, 5}
    assert draws(SamplingParams(temperature=1.0, top_p=0.01, seed=0)) == {1}


def test_full_distribution_reaches_every_token():
    assert draws(SamplingParams(temperature=3.0, seed=1), 2000) == set(range(len(LOGITS)))


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
