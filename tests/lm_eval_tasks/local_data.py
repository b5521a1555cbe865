"""The tiny lm-eval tasks' documents, read from the JSONL files beside this one (no network,
no dataset cache): lm-eval calls these through `custom_dataset` in the task YAMLs."""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    import datasets

    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**_):
    return _load("multiple_choice.jsonl")


def generation(**_):
    return _load("generation.jsonl")
