"""launcher/generate.py under real torchrun: JSONL in, JSONL out, errors reported per line.

The tiny model runs disaggregated (1 model worker + 1 attention worker). Good lines must
produce the reference model's greedy tokens; each malformed line must come back as an error
record naming its line and the problem, without stopping the others. Layout mistakes must
stop the job at start-up with one line naming the keys and values.
"""

from __future__ import annotations

import json

import pytest
from tiny_models import make_tokenizer
from torchrun import torchrun

from megatron_lamina.engine.sampling import SamplingParams

GOOD = [
    {"id": "a", "prompt": "w5 w9 w14 w3", "max_tokens": 5, "temperature": 0, "ignore_eos": True},
    {"id": 7, "messages": [{"role": "user", "content": "w40 w41 w42"}], "max_tokens": 4, "temperature": 0, "ignore_eos": True},
]
BAD = [
    ("{not json", "invalid JSON"),
    (json.dumps({"prompt": "w1"}), "'id' is required"),
    (json.dumps({"id": "b", "prompt": "w1", "messages": []}), "exactly one of 'prompt' and 'messages'"),
    (json.dumps({"id": "c", "prompt": "w1", "colour": "red"}), "unknown field(s) ['colour']"),
    (json.dumps({"id": "d", "prompt": "w1", "max_tokens": "ten"}), "'max_tokens' has the wrong type"),
    (json.dumps({"id": "e", "prompt": "w1", "temperature": -1}), "temperature = -1"),
    (json.dumps({"id": "f", "prompt": ""}), "'prompt' must be a non-empty string"),
    (json.dumps({"id": "g", "prompt": " ".join(["w3"] * 300)}), "the model's context is 256 tokens"),
]


def _config(tmp_path, checkpoint, **parallel):
    layout = {"tensor_parallel": 1, "attention_workers": 1, "attention_head_groups": 1, **parallel}
    lines = [f"model:\n  checkpoint: {checkpoint}", "parallel:"] + [f"  {k}: {v}" for k, v in layout.items()]
    lines += ["kv_cache:\n  block_size: 4\n  num_blocks: 64"]
    path = tmp_path / "tiny.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batch_job_with_malformed_lines(tmp_path, tiny_models):
    model = tiny_models["untied"]
    job = tmp_path / "in.jsonl"
    lines = [json.dumps(GOOD[0])] + [text for text, _ in BAD] + [json.dumps(GOOD[1])]
    job.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    result = torchrun("launcher/generate.py", 2, "--config", str(_config(tmp_path, model.canonical_dir)),
                      "--input", str(job), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(lines)
    errors = [r for r in records if r["finish_reason"] == "error"]
    assert len(errors) == len(BAD)
    for line_no, (_, message) in enumerate(BAD, start=2):
        hit = [r for r in errors if r["error"].startswith(f"line {line_no}:")]
        assert len(hit) == 1 and message in hit[0]["error"], (line_no, hit)
        assert f"in.jsonl:line {line_no}:" in result.stderr

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


@pytest.mark.parametrize("nproc, overrides, message", [
    (2, ["parallel.attention_workers=2"],
     "parallel.tensor_parallel (1) + parallel.attention_workers (2) = 3 but the job has 2 ranks"),
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
