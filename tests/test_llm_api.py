"""`megatron_lamina.LLM`, the offline Python API, in this process (no torchrun): the tiny model
colocated on one rank against `transformers`: greedy and seeded tokens, prompts as text and
token ids, one SamplingParams per prompt, chat through the template, log-probabilities, cache
salts that keep prefix-cache blocks apart; the
process group it created is gone after `close` (one that was there before it stays)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from tiny_models import make_tokenizer, reference_generate

from megatron_lamina.requests.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_models):
    import megatron_lamina

    before = dist.is_initialized()  # another in-process test may have left one
    engine = megatron_lamina.LLM(str(tiny_models["untied"].canonical_dir), num_blocks=64, block_size=4,
                                 max_prefill_tokens=8)
    yield engine
    engine.close()
    assert dist.is_initialized() == before  # LLM removes what it made, and only that


def test_generate_equals_transformers(llm, tiny_models):
    tok = make_tokenizer()
    prompts = ["w5 w9 w14 w3", tok("w40 w41 w42 w43 w44 w45 w46 w47 w48 w49")["input_ids"], "w77"]
    ids = [tok(p)["input_ids"] if isinstance(p, str) else p for p in prompts]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=0.9, top_k=40, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=0, ignore_eos=True, logprobs=2)]
    out = llm.generate(prompts, params)
    expected, logits = reference_generate(tiny_models["untied"].hf_dir, ids, params)
    assert [o.token_ids for o in out] == expected
    assert [o.prompt_token_ids for o in out] == ids
    assert all(o.finish_reason == "length" for o in out)
    assert out[0].text == tok.decode(expected[0], skip_special_tokens=True) and out[0].logprobs is None
    reference = torch.log_softmax(logits[2], -1)
    assert [round(e.logprob, 4) for e in out[2].logprobs] == \
        [round(reference[j, t].item(), 4) for j, t in enumerate(expected[2])]
    [alone] = llm.generate("w5 w9 w14 w3", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert alone.token_ids == expected[0]  # one prompt, one SamplingParams


def test_chat_uses_the_template(llm, tiny_models):
    tok = make_tokenizer()
    messages = [{"role": "user", "content": "w40 w41 w42"}]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=0)
    [out] = llm.chat(messages, params)
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    expected, _ = reference_generate(tiny_models["untied"].hf_dir, [ids], [params])
    assert out.prompt_token_ids == ids and out.token_ids == expected[0]
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    two = llm.chat([messages, messages], [params, params])
    assert [o.token_ids for o in two] == [expected[0]] * 2


def test_mistakes_name_the_problem(llm):
    with pytest.raises(ValueError, match="2 prompts but 1 SamplingParams"):
        llm.generate(["w1", "w2"], [SamplingParams()])
    with pytest.raises(ValueError, match="prompt has 300 tokens"):
        llm.generate([[5] * 300])
    [ok] = llm.generate("w1", SamplingParams(max_tokens=2, ignore_eos=True, temperature=0))
    assert len(ok.token_ids) == 2  # nothing of the refused prompts was left running


def test_llm_takes_the_configs_defaults():
    """Every keyword argument of LLM is a config key whose default is the config's own (None in
    the signature): LLM's effective config is the default config but for its one-rank layout
    and, on a CPU, its KV blocks; a value given lands on its key; a wrong one names the key."""
    import inspect

    from megatron_lamina.config import ConfigError, load_config
    from megatron_lamina.llm import CONFIG_KEYS, CPU_KV_BLOCKS, LLM, ONE_RANK, llm_config

    arguments = inspect.signature(LLM.__init__).parameters
    assert set(arguments) - {"self", "checkpoint"} == set(CONFIG_KEYS)
    assert all(arguments[name].default is None for name in CONFIG_KEYS)
    default = load_config(None, values={"model.checkpoint": "m"}).to_dict()
    expected = dict(default)
    for key, value in {**ONE_RANK, "kv_cache.num_blocks": CPU_KV_BLOCKS}.items():
        section, name = key.split(".")
        expected[section] = {**expected[section], name: value}
    assert llm_config("m").to_dict() == expected
    on_cuda = llm_config("m", device="cuda").to_dict()
    assert on_cuda["kv_cache"] == default["kv_cache"]  # num_blocks "auto", the config's default
    given = {"device": "cuda", "dtype": "bfloat16", "max_batch_size": 3, "num_blocks": 7, "block_size": 4,
             "max_prefill_tokens": 5, "memory_fraction": 0.5, "cuda_graphs": False, "async_scheduling": False,
             "kv_cache_dtype": "fp8_e4m3", "weight_dtype": "fp8_e4m3"}
    cfg = llm_config("m", **given).to_dict()
    for name, key in CONFIG_KEYS.items():
        section, field = key.split(".")
        assert cfg[section][field] == given[name] != default[section][field], key
    with pytest.raises(ConfigError, match=r"^config: kv_cache.block_size = 0: must be an integer in 1..1024$"):
        llm_config("m", block_size=0)


def test_cache_salts_keep_prefixes_apart(llm):
    """`cache_salt` as the server takes it: a prompt repeated under its salt finds its two full
    blocks in the prefix cache; under another salt, or none, it finds nothing; a salt per
    prompt goes to its own prompt; the tokens never change; a salt the request schema refuses,
    or too few of them, is a ValueError naming the field."""
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompt = [11, 12, 13, 14, 15, 16, 17, 18, 19]  # two full blocks of 4, then the token always computed
    [first] = llm.generate(prompt, greedy, cache_salt="tenant-a")
    [other] = llm.generate(prompt, greedy, cache_salt="tenant-b")
    [again] = llm.generate(prompt, greedy, cache_salt="tenant-a")
    [plain, salted] = llm.generate([prompt, prompt], greedy, cache_salt=[None, "tenant-b"])
    assert (first.num_cached_tokens, other.num_cached_tokens, again.num_cached_tokens) == (0, 0, 8)
    assert (plain.num_cached_tokens, salted.num_cached_tokens) == (0, 8)
    assert first.token_ids == other.token_ids == again.token_ids == plain.token_ids == salted.token_ids
    with pytest.raises(ValueError, match="cache_salt = '': String should have at least 1 character"):
        llm.generate(prompt, greedy, cache_salt="")
    with pytest.raises(ValueError, match="2 prompts but 1 cache salts"):
        llm.chat([[{"role": "user", "content": "w1"}]] * 2, greedy, cache_salt=["tenant-a"])
