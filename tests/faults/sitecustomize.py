"""Faults injected into the processes of a real job, for tests/test_request_isolation.py and
tests/test_liveness.py.

A test puts this directory on PYTHONPATH and names the faults in LAMINA_TEST_FAULT
(comma-separated); Python imports this module at start-up in every process of the job (the
launcher, the ranks, the front end), and it patches one function when its module is first
imported, in the processes that import it:

  detokenize:ID   the `tokenizers` library's `DecodeStream.step` raises on token ID, as it does
                  on some tokenizers' invalid byte sequences ("Invalid prefix encountered")
  append:ID       `LLMEngine._append_token` raises on token ID
  slow_prefill:S  a step that prefills at least 64 tokens of one micro-batch takes S seconds
                  longer on the model workers, after its last attention exchange (the last
                  layer's MLP and the head of a long prompt on a slow device), so the step
                  outlasts `runtime.step_timeout_s` while no wait inside it does
"""

from __future__ import annotations

import importlib.abc
import os
import sys

FAULTS = dict(item.split(":") for item in os.environ.get("LAMINA_TEST_FAULT", "").split(",") if item)


def _detokenize(module) -> None:
    real, token_id = module.DecodeStream, int(FAULTS["detokenize"])

    class FaultyDecodeStream:
        def __init__(self, ids=None, skip_special_tokens=False):
            self.stream = real(ids=ids, skip_special_tokens=skip_special_tokens)

        def step(self, tokenizer, token):
            if token == token_id:
                raise Exception("Invalid prefix encountered (injected by tests/faults)")
            return self.stream.step(tokenizer, token)

    module.DecodeStream = FaultyDecodeStream


def _append(module) -> None:
    real, token_id = module.LLMEngine._append_token, int(FAULTS["append"])

    def _append_token(self, request, token):
        if token == token_id:
            raise RuntimeError(f"token {token} (injected by tests/faults)")
        return real(self, request, token)

    module.LLMEngine._append_token = _append_token


def _slow_prefill(module) -> None:
    import time

    real, seconds = module.LlamaModel.last_stage, float(FAULTS["slow_prefill"])

    def last_stage(self, residual, attention_out):
        if residual.shape[0] >= 64:
            time.sleep(seconds)
            print(f"fault: slow_prefill slept {seconds:g} s", file=sys.stderr, flush=True)  # it fired
        return real(self, residual, attention_out)

    module.LlamaModel.last_stage = last_stage


PATCHES = {"tokenizers.decoders": ("detokenize", _detokenize),
           "megatron_lamina.driver.llm_engine": ("append", _append),
           "megatron_lamina.model.llama": ("slow_prefill", _slow_prefill)}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of a patched module so the patch runs after it."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES or PATCHES[name][0] not in FAULTS:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                exec_module, patch = spec.loader.exec_module, PATCHES[name][1]

                def exec_and_patch(module):
                    exec_module(module)
                    patch(module)

                spec.loader.exec_module = exec_and_patch
                return spec
        return None


if FAULTS:
    sys.meta_path.insert(0, _PatchAfterImport())
