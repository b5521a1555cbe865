"""EleutherAI's lm-evaluation-harness against the server, as users evaluate a converted checkpoint.

The default model (SmolLM2, float32) served disaggregated (1 model worker + 1 attention
worker, prompts prefilled in chunks) with an API key, evaluated by lm-eval's own
`local-completions` model (token-id prompts, 4 per request; `echo` + `logprobs` +
`max_tokens: 1` for log-likelihoods; greedy `generate_until` with stop strings) on two tiny
tasks of tests/lm_eval_tasks/ (local JSONL, no network), and by lm-eval's `hf` model on the
same weights in transformers: every choice's log-likelihood within 1e-3, the same accuracy,
the same generated text.
"""

from __future__ import annotations

from pathlib import Path

from server_proc import ServerProcess, tiny_server_config

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
API_KEY = "lm-eval-key"


def _evaluate(model, model_args=None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["lamina_mc", "lamina_gen"],
                                   task_manager=TaskManager(include_path=str(TASKS)), log_samples=True,
                                   random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def _by_doc(results: dict, task: str) -> dict[int, list]:
    return {s["doc_id"]: s["filtered_resps"] for s in results["samples"][task]}


def test_lm_eval_through_the_server_equals_hf(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the tasks read local files only
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # what local-completions sends as its bearer token
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    hf_model, canonical = smollm2
    config, port = tiny_server_config(tmp_path, canonical, parallel={"attention_workers": 1},
                                      server={"api_key": API_KEY})
    server = ServerProcess(config, port, 2, tmp_path / "server.log")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(canonical / "tokenizer"))
        reference = _evaluate(HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=1))  # while the server starts
        server.wait_healthy()
        served = _evaluate("local-completions", {
            "base_url": f"{server.url}/v1/completions", "model": canonical.name,
            "tokenizer": str(canonical / "tokenizer"), "tokenizer_backend": "huggingface",
            "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1, "batch_size": 4})
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
