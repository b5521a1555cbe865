"""The batch job for real (tiny model, 1 model worker + 1 attention worker): `lamina generate`,
and launcher/generate.py under torchrun.

Good lines must produce the reference model's greedy tokens; every other line (not UTF-8, not
JSON, a field the shared schema refuses, a repeated id, a prompt or max_tokens beyond the
context) must come back as exactly one error record naming its line and the problem, without
stopping the others; the job ends with a summary line and exits 1. Without a terminal,
progress comes as log lines. Layout mistakes stop the job at start-up with one line naming
the keys and values.
"""

from __future__ import annotations

import json

import pytest
from tiny_models import make_tokenizer
from torchrun import lamina, torchrun

from megatron_lamina.requests.sampling_params import SamplingParams

GOOD = [
    {"id": "a", "prompt": "w5 w9 w14 w3", "max_tokens": 5, "temperature": 0, "ignore_eos": True},
    {"id": 7, "messages": [{"role": "user", "content": "w40 w41 w42"}], "max_tokens": 4, "temperature": 0, "ignore_eos": True},
]
PENALIZED = {"id": "p", "prompt": "w5 w9 w5 w9", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
             "repetition_penalty": 1.5, "presence_penalty": 0.5, "frequency_penalty": 0.25, "logit_bias": {"9": -100},
             "logprobs": 2}
SCORED = {"id": "s", "prompt": [1, 7, 8, 9], "max_tokens": 0, "prompt_logprobs": 1}
BAD = [  # (the line's bytes, what its error says)
    (b"{not json", "invalid JSON (Expecting property name enclosed in double quotes at column 2)"),
    (b'{"id": "x", "prompt": "caf\xe9"}', "not valid UTF-8 (byte 0xe9"),
    (json.dumps({"prompt": "w1"}).encode(), "id: required"),
    (json.dumps({"id": "b", "prompt": "w1", "messages": [{"role": "user", "content": "w1"}]}).encode(),
     "exactly one of 'prompt' and 'messages' is required"),
    (json.dumps({"id": "c", "prompt": "w1", "colour": "red"}).encode(), "unknown field 'colour'"),
    (json.dumps({"id": "d", "prompt": "w1", "max_tokens": "ten"}).encode(),
     "max_tokens: Input should be a valid integer"),
    (json.dumps({"id": "e", "prompt": "w1", "temperature": 5}).encode(),
     "temperature: must be a number in [0, 2]"),
    (json.dumps({"id": "f", "prompt": ""}).encode(), "prompt: the prompt is empty"),
    (json.dumps({"id": "g", "prompt": " ".join(["w3"] * 300)}).encode(), "the model's context is 256 tokens"),
    (json.dumps({"id": "h", "prompt": "w1", "max_tokens": 10**8}).encode(),
     "max_tokens = 100000000 is too large: the prompt has 2 tokens and the model's context is 256"),
    (json.dumps({"id": "i", "prompt": "w1 \ud800"}).encode(), "prompt: not valid Unicode (a lone surrogate"),
    (json.dumps({"id": "j", "prompt": [True, False]}).encode(), "prompt: must be a string, a list of strings"),
    (json.dumps({"id": "l", "prompt": "w1", "logit_bias": {"300": 1}}).encode(),
     "logit_bias: token ids [300] are outside the vocabulary (0..255)"),
    (json.dumps({"id": "m", "prompt": "w1", "max_tokens": 0}).encode(), "max_tokens: 0 generates nothing"),
    (json.dumps({"id": "k", "prompt": "w1", "seed": 2**64}).encode(), "seed: must be null or an integer in"),
    (json.dumps({"id": "a", "prompt": "w2"}).encode(), "duplicate id 'a' (first on line 1)"),
]


def _config(tmp_path, checkpoint, **parallel):
    layout = {"tensor_parallel": 1, "attention_workers": 1, "attention_head_groups": 1, **parallel}
    lines = [f"model:\n  checkpoint: {checkpoint}", "parallel:"] + [f"  {k}: {v}" for k, v in layout.items()]
    lines += ["kv_cache:\n  block_size: 4\n  num_blocks: 64"]
    path = tmp_path / "tiny.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batch_job_keeps_its_promises(tmp_path, tiny_models):
    model = tiny_models["untied"]
    job = tmp_path / "in.jsonl"
    lines = [json.dumps(GOOD[0]).encode()] + [raw for raw, _ in BAD] + [json.dumps(g).encode()
                                                                          for g in (GOOD[1], PENALIZED, SCORED)]
    job.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "new" / "dir" / "out.jsonl"  # its directory does not exist yet
    result = lamina("generate", "--config", str(_config(tmp_path, model.canonical_dir)),
                    "--input", str(job), "--output", str(out), "--progress-interval", "0")
    assert result.returncode == 1, result.stderr[-3000:]  # some lines failed
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(lines)  # one record per line
    errors = [r for r in records if r["finish_reason"] == "error"]
    assert len(errors) == len(BAD)
    for line_no, (_, message) in enumerate(BAD, start=2):
        hit = [r for r in errors if r["line"] == line_no]
        assert len(hit) == 1 and hit[0]["error"].startswith(f"line {line_no}: ") and message in hit[0]["error"], \
            (line_no, hit)
        assert f"in.jsonl:line {line_no}:" in result.stderr
    assert [r["id"] for r in records].count("a") == 1  # the duplicate's record has no id
    stderr = result.stderr.splitlines()
    assert stderr[-1] == f"summary: 4 ok, {len(BAD)} failed; records in {out}", stderr[-5:]
    assert any(line.startswith("progress: ") and f"/{len(lines)} lines" in line for line in stderr), stderr  # no TTY

    # The good lines: exactly the reference model's greedy continuation of the same ids.
    from tiny_models import reference_generate

    tok = make_tokenizer()
    prompts = [tok(GOOD[0]["prompt"])["input_ids"],
               tok(tok.apply_chat_template(GOOD[1]["messages"], add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"]]
    params = [SamplingParams(max_tokens=g["max_tokens"], temperature=0) for g in GOOD]
    expected, _ = reference_generate(model.hf_dir, prompts, params)
    by_id = {r["id"]: r for r in records}
    for good, tokens in zip(GOOD, expected):
        record = by_id[good["id"]]
        assert record["token_ids"] == tokens and record["finish_reason"] == "length"
        assert record["text"] == tok.decode(tokens, skip_special_tokens=True)
    assert f"[a] {by_id['a']['text']}" in result.stdout
    _check_new_fields(model, by_id["p"], by_id["s"])


def _check_new_fields(model, penalized_record, scored):
    """The fields of issue 15 reach the engine: penalties and bias as their definitions on
    transformers' logits; log-probabilities of the raw logits; a prompt scored."""
    import torch
    from tiny_models import continue_with, penalized
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model.hf_dir, dtype=torch.float32).eval()
    prompt = make_tokenizer()(PENALIZED["prompt"])["input_ids"]
    want = continue_with(hf, prompt, 4, lambda row, p, o: int(penalized(row, p, o, 0.5, 0.25, 1.5, {9: -100}).argmax()))
    assert penalized_record["token_ids"] == want != continue_with(hf, prompt, 4, lambda row, p, o: int(row.argmax()))
    with torch.no_grad():
        raw = torch.log_softmax(hf(torch.tensor([prompt + want])).logits[0].float(), -1)
    for j, entry in enumerate(penalized_record["logprobs"]):
        row = raw[len(prompt) - 1 + j]
        assert entry["token_id"] == want[j] and abs(entry["logprob"] - row[want[j]].item()) < 1e-4
        assert [t["token_id"] for t in entry["top_logprobs"]] == row.topk(2).indices.tolist()
    ids = SCORED["prompt"]
    with torch.no_grad():
        raw = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    assert scored["token_ids"] == [] and scored["finish_reason"] == "length" and scored["prompt_logprobs"][0] is None
    assert [round(e["logprob"], 4) for e in scored["prompt_logprobs"][1:]] == \
        [round(raw[i - 1, ids[i]].item(), 4) for i in range(1, len(ids))]


@pytest.mark.parametrize("nproc, overrides, message", [
    (1, ["parallel.attention_workers=1"],
     "parallel.tensor_parallel (1) + parallel.attention_workers (1) = 2 but the job has 1 ranks"),
    (3, ["parallel.tensor_parallel=3", "parallel.attention_workers=0"], "parallel.tensor_parallel = 3"),
    (1, ["scheduler.micro_batchez=2"], "unknown key 'scheduler.micro_batchez'"),
    (1, ["runtime.device=tpu"], "runtime.device = 'tpu': allowed values are cpu, cuda"),
])
def test_layout_errors_stop_the_job(tmp_path, tiny_models, nproc, overrides, message):
    model = tiny_models["untied"]
    job = tmp_path / "in.jsonl"
    job.write_text(json.dumps(GOOD[0]) + "\n")
    sets = [arg for o in overrides for arg in ("--set", o)]
    result = torchrun("launcher/generate.py", nproc, "--config", str(_config(tmp_path, model.canonical_dir)),
                      *sets, "--input", str(job), "--output", str(tmp_path / "out.jsonl"), "--quiet")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: config:")]
    assert errors and message in errors[0], result.stderr[-3000:]
