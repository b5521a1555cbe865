"""EleutherAI's lm-evaluation-harness against the server, as users evaluate a converted checkpoint.

The default model (SmolLM2, float32) served disaggregated (1 model worker + 1 attention
worker, prompts prefilled in chunks) with an API key, evaluated by lm-eval's own
`local-completions` model (token-id prompts, 4 per request; `echo` + `logprobs` +
`max_tokens: 1` for log-likelihoods; greedy `generate_until` with stop strings) on two tiny
tasks of tests/lm_eval_tasks/ (local JSONL, no network), and by lm-eval's `hf` model on the
same weights in transformers (evaluated once for the module): every choice's log-likelihood
within 1e-3, the same accuracy, the same generated text. The FP8 modes (issue 26: FP8 KV, FP8
weights quantized at load, both) are each one colocated server, held to the measured bounds
against the same reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from at_once import at_once
from server_proc import ServerProcess, tiny_server_config

pytestmark = pytest.mark.xdist_group("smollm2")  # the `smollm2` session fixture: built once, on one worker (conftest)

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
API_KEY = "lm-eval-key"


def _evaluate(model, model_args=None) -> dict:
    """The two local tasks only: indexing lm-eval's thousands of bundled task files besides
    them (include_defaults) would be most of an evaluation's cost."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["lamina_mc", "lamina_gen"],
                                   task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
                                   log_samples=True,
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def _by_doc(results: dict, task: str) -> dict[int, list]:
    return {s["doc_id"]: s["filtered_resps"] for s in results["samples"][task]}


def _served(server: ServerProcess, canonical: Path) -> dict:
    """lm-eval's `local-completions` model against `server`."""
    return _evaluate("local-completions", {
        "base_url": f"{server.url}/v1/completions", "model": canonical.name,
        "tokenizer": str(canonical / "tokenizer"), "tokenizer_backend": "huggingface",
        "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1, "batch_size": 4})


@pytest.fixture(scope="module")
def hf_results(smollm2):
    """lm-eval's `hf` model on the unquantized weights in transformers: evaluated once for the
    module, when a test first asks (each asks while its servers start)."""
    results: list[dict] = []

    def evaluate() -> dict:
        if not results:
            from lm_eval.models.huggingface import HFLM
            from transformers import AutoTokenizer

            hf_model, canonical = smollm2
            tokenizer = AutoTokenizer.from_pretrained(str(canonical / "tokenizer"))
            results.append(_evaluate(HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=1)))
        return results[0]
    return evaluate


@pytest.fixture
def offline_lm_eval(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the tasks read local files only
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # what local-completions sends as its bearer token


def test_lm_eval_through_the_server_equals_hf(smollm2, hf_results, offline_lm_eval, tmp_path):
    _, canonical = smollm2
    config, port = tiny_server_config(tmp_path, canonical, parallel={"attention_workers": 1},
                                      server={"api_key": API_KEY})
    server = ServerProcess(config, port, 2, tmp_path / "server.log")
    try:
        reference = hf_results()  # while the server starts
        served = _served(server.wait_healthy(), canonical)
        log = server.output()
    finally:
        server.stop()

    choices = _by_doc(served, "lamina_mc")
    want = _by_doc(reference, "lamina_mc")
    assert sorted(choices) == sorted(want) == list(range(6))
    for doc, lls in choices.items():
        assert len(lls) == len(want[doc]) == 3
        for (ll, greedy), (ref_ll, ref_greedy) in zip(lls, want[doc]):
            assert abs(ll - ref_ll) < 1e-3, (doc, lls, want[doc])
            assert greedy == ref_greedy
    assert served["results"]["lamina_mc"]["acc,none"] == reference["results"]["lamina_mc"]["acc,none"]
    generated, want_text = _by_doc(served, "lamina_gen"), _by_doc(reference, "lamina_gen")
    assert generated == want_text and any(text[0].strip() for text in generated.values())
    # lm-eval's requests (4 prompts per request: 18 log-likelihoods, 4 generations) went through
    # the API key and are in the access log, one line each
    assert log.count('"POST /v1/completions" 200') == 5 + 1, log[-3000:]


# ------------------------------------------------------------------------------------- FP8

# The FP8 modes (issue 26), each its own server over the same float32 checkpoint: the cache in
# e4m3, the linear weights quantized at load (model.weight_dtype, as `lamina convert
# --weight-dtype fp8_e4m3` writes them), and both.
FP8_MODES = {
    "fp8 KV": {"kv_cache": {"dtype": "fp8_e4m3"}},
    "fp8 weights": {"model": {"weight_dtype": "fp8_e4m3"}},
    "fp8 weights + KV": {"kv_cache": {"dtype": "fp8_e4m3"}, "model": {"weight_dtype": "fp8_e4m3"}},
}
# Bounds against the unquantized model (transformers, which the unquantized server equals
# within 1e-3 above). Measured 2026-12-07 (docs/BENCHMARKS.md, FP8 section), over the 18
# choices' log-likelihoods (each a sum over the choice's tokens): max |diff| 0.33 / 1.27 / 1.05
# and mean 0.14 / 0.59 / 0.56 for KV / weights / both; the bounds are twice those (other
# torch builds round the dequantized float32 products differently), while a weight or cache
# read without its scale moves them by tens. Accuracy was unchanged in every mode; one of the
# six questions may flip (its two best choices within the shift above). Two of the four
# greedy generations were the unquantized text in every mode (the others part at near ties, as
# BENCHMARKS' greedy agreement shows); at least one must stay.
FP8_BOUNDS = {
    "fp8 KV": {"max_ll_diff": 0.7, "mean_ll_diff": 0.3, "acc_change": 1 / 6, "same_text": 1},
    "fp8 weights": {"max_ll_diff": 2.6, "mean_ll_diff": 1.2, "acc_change": 1 / 6, "same_text": 1},
    "fp8 weights + KV": {"max_ll_diff": 2.6, "mean_ll_diff": 1.2, "acc_change": 1 / 6, "same_text": 1},
}


def _fp8_measure(served: dict, reference: dict) -> dict:
    """Per mode: the largest and mean |difference| of a choice's log-likelihood, the accuracy's
    change, and how many generations are the unquantized text."""
    got, want = _by_doc(served, "lamina_mc"), _by_doc(reference, "lamina_mc")
    diffs = [abs(ll - ref) for doc in want for (ll, _), (ref, _) in zip(got[doc], want[doc])]
    texts, want_texts = _by_doc(served, "lamina_gen"), _by_doc(reference, "lamina_gen")
    return {"max_ll_diff": max(diffs), "mean_ll_diff": sum(diffs) / len(diffs), "choices": len(diffs),
            "acc": served["results"]["lamina_mc"]["acc,none"],
            "acc_change": served["results"]["lamina_mc"]["acc,none"] - reference["results"]["lamina_mc"]["acc,none"],
            "same_text": sum(texts[d] == want_texts[d] for d in want_texts), "texts": len(want_texts)}


def test_lm_eval_through_the_server_in_the_fp8_modes(smollm2, hf_results, offline_lm_eval, tmp_path):
    """One colocated one-rank server per FP8 mode (lm-eval's same requests), against
    transformers on the unquantized weights. The three start at once, beside the reference's
    evaluation where no test before asked for it, and are evaluated at once."""
    _, canonical = smollm2
    servers = {}
    try:
        for mode, sections in FP8_MODES.items():
            config, port = tiny_server_config(tmp_path, canonical, parallel={"attention_workers": 0},
                                              scheduler={"micro_batches": 1}, server={"api_key": API_KEY}, **sections)
            servers[mode] = ServerProcess(config, port, 1, tmp_path / f"server-{port}.log")
        reference = hf_results()  # while they start
        # Each server has one client, as before; the three evaluations run at once, since each
        # one-rank server computes on one core and lm-eval's client waits on it.
        served = dict(zip(servers, at_once(*(lambda server=server: _served(server.wait_healthy(), canonical)
                                             for server in servers.values()))))
        measured = {mode: _fp8_measure(served[mode], reference) for mode in servers}
    finally:
        for server in servers.values():
            server.stop()
    print("FP8 lm-eval against the unquantized model:", measured)
    assert set(FP8_BOUNDS) == set(measured)
    for mode, bound in FP8_BOUNDS.items():
        m = measured[mode]
        assert m["max_ll_diff"] <= bound["max_ll_diff"] and m["mean_ll_diff"] <= bound["mean_ll_diff"], (mode, m)
        assert abs(m["acc_change"]) <= bound["acc_change"], (mode, m)
        assert m["same_text"] >= bound["same_text"], (mode, m)
