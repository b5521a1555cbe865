"""Offline generation in one Python process, as users of vLLM's `LLM` class expect.

    from megatron_lamina import LLM, SamplingParams

    llm = LLM("checkpoints/smollm2-135m-instruct")   # or a Hugging Face directory, or a GGUF file
    [out] = llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))
    print(out.text)
    llm.chat([{"role": "user", "content": "Hi!"}], {"max_tokens": 32, "n": 2})

The job is the colocated single-device layout (one model worker, attention on it) run in
this process, without torchrun: a one-rank process group on a free loopback port when none
exists (gloo; NCCL too on CUDA), then the launchers' own start-up (`runtime.start_rank`)
and the same `LLMEngine`, scheduler and batched sampler the server and the batch job run.
`generate` and `chat` take one prompt or conversation or a list of them (prompts as text or
token ids), one `SamplingParams` (or a dict of its fields) for all or one per prompt, and `n`
samples per prompt (an argument, or an "n" key in a dict; sample i seeded `seed + i`, as the
server does), and a `cache_salt` for all or one per prompt (the server's request field: only
prompts with the same salt share prefix-cache blocks), run them through continuous batching
and return `n` `Generation`s per input, in input order (prompt-major, as the server's
choices), each with the prompt tokens it took from the prefix cache. The checkpoint may be a Hugging Face
directory or a GGUF file, converted once and cached as the launchers do
(checkpoint/auto_convert.py), and torch's threads are what the launchers give one rank.
`close` (or a `with` block) releases the process group this object created.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
from pydantic import ValidationError

from megatron_lamina.checkpoint.auto_convert import canonical_checkpoint
from megatron_lamina.config import LaminaConfig, load_config
from megatron_lamina.driver.llm_engine import LLMEngine
from megatron_lamina.requests.prompt import PromptInput
from megatron_lamina.requests.request_schema import SamplingFields
from megatron_lamina.driver.request import Request
from megatron_lamina.requests.output import TokenLogprob
from megatron_lamina.worker.runtime import start_rank
from megatron_lamina.requests.sampling_params import SamplingParams
from megatron_lamina.launch.ranks import threads_per_rank

CPU_KV_BLOCKS = 1024  # `num_blocks` default on a CPU, where "auto" would take most of the host's memory

# LLM's keyword arguments and the config keys they set. An argument left None is its key's
# default, read from config.py's sections (the one place defaults are written).
CONFIG_KEYS = {
    "device": "runtime.device",
    "dtype": "model.dtype",
    "max_batch_size": "scheduler.max_batch_size",
    "num_blocks": "kv_cache.num_blocks",
    "block_size": "kv_cache.block_size",
    "max_prefill_tokens": "scheduler.max_prefill_tokens",
    "memory_fraction": "kv_cache.memory_fraction",
    "cuda_graphs": "runtime.cuda_graphs",
    "async_scheduling": "scheduler.async_scheduling",
    "kv_cache_dtype": "kv_cache.dtype",
    "weight_dtype": "model.weight_dtype",
}
# The layout LLM runs, whatever the defaults: one rank, attention colocated, one micro-batch.
ONE_RANK = {"parallel.tensor_parallel": 1, "parallel.attention_workers": 0, "scheduler.micro_batches": 1}

Message = dict[str, str]
Sampling = SamplingParams | dict | Sequence[SamplingParams | dict] | None  # one for all prompts, or one each
Salts = str | Sequence[str | None] | None  # one cache_salt for all prompts, or one each


@dataclass
class Generation:
    """What one prompt produced."""

    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str                                # "stop" (EOS, stop string or token) or "length"
    logprobs: list[TokenLogprob] | None               # per generated token, with SamplingParams.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None  # per prompt token (the first None), with prompt_logprobs
    num_cached_tokens: int = 0                        # prompt tokens taken from the prefix cache


class LLM:
    def __init__(self, checkpoint: str, *, device: str | None = None, dtype: str | None = None,
                 max_batch_size: int | None = None, num_blocks: int | str | None = None,
                 block_size: int | None = None, max_prefill_tokens: int | None = None,
                 memory_fraction: float | None = None, cuda_graphs: bool | None = None,
                 async_scheduling: bool | None = None, kv_cache_dtype: str | None = None,
                 weight_dtype: str | None = None):
        """`checkpoint`: a canonical checkpoint directory (`lamina convert`), a Hugging Face model
        directory or a GGUF file (converted once and cached). The other arguments are config
        keys (CONFIG_KEYS); None, or left out, is the key's default (`llm_config`). A wrong value
        raises `ConfigError` naming it."""
        if "OMP_NUM_THREADS" not in os.environ:  # what `lamina` gives a one-rank job
            torch.set_num_threads(threads_per_rank(1))
        self.cfg = llm_config(
            canonical_checkpoint(str(checkpoint)), device=device, dtype=dtype, max_batch_size=max_batch_size,
            num_blocks=num_blocks, block_size=block_size, max_prefill_tokens=max_prefill_tokens,
            memory_fraction=memory_fraction, cuda_graphs=cuda_graphs, async_scheduling=async_scheduling,
            kv_cache_dtype=kv_cache_dtype, weight_dtype=weight_dtype)
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            _init_one_rank(self.cfg)
        elif dist.get_world_size() != 1:
            raise RuntimeError(f"LLM runs in one process, but this one is rank {dist.get_rank()} of a "
                               f"{dist.get_world_size()}-rank job: use `lamina serve|generate` for several ranks")
        try:
            self.engine = LLMEngine(start_rank(self.cfg))
        except BaseException:
            if self._owns_group:
                dist.destroy_process_group()
            raise

    @property
    def tokenizer(self):
        """The checkpoint's Hugging Face tokenizer."""
        return self.engine.codec.tokenizer

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]], sampling: Sampling = None,
                 n: int | None = None, *, cache_salt: Salts = None) -> list[Generation]:
        """One prompt (text, or token ids) or a list of them; `n` samples of each (default 1)."""
        if isinstance(prompts, str) or prompts and all(type(t) is int for t in prompts):
            prompts = [prompts]
        items = [PromptInput(prompt=p) if isinstance(p, str) else PromptInput(prompt_token_ids=list(p))
                 for p in prompts]
        return self._run(items, sampling, n, cache_salt)

    def chat(self, conversations: list[Message] | Sequence[list[Message]], sampling: Sampling = None,
             n: int | None = None, *, cache_salt: Salts = None) -> list[Generation]:
        """One conversation (a list of {"role", "content"} messages) or a list of them; the
        checkpoint's chat template is applied with the generation prompt."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self._run([PromptInput(messages=list(c)) for c in conversations], sampling, n, cache_salt)

    def _run(self, items: list[PromptInput], sampling: Sampling, n: int | None, cache_salt: Salts) -> list[Generation]:
        if sampling is None or isinstance(sampling, (SamplingParams, dict)):
            sampling = [sampling] * len(items)
        if len(sampling) != len(items):
            raise ValueError(f"{len(items)} prompts but {len(sampling)} SamplingParams: give one, or one per prompt")
        requests = []
        for item, given, salt in zip(items, sampling, _salts(cache_salt, len(items))):
            for params in _samples(given, n):
                request = self.engine.make_request(dataclasses.replace(item, params=params, cache_salt=salt))
                self.engine.scheduler.check_fits(request)  # every prompt checked before any runs
                requests.append(request)
        for request in requests:
            self.engine.admit(request)
        while self.engine.has_work():
            self.engine.step()
        return [_generation(r) for r in requests]

    def close(self) -> None:
        """Release the engine and, if this object created it, the process group."""
        if self.engine is None:
            return
        self.engine.shutdown()
        self.engine = None
        if self._owns_group:
            dist.destroy_process_group()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def llm_config(checkpoint: str, **arguments) -> LaminaConfig:
    """The config an `LLM` runs: the one-rank layout (ONE_RANK), the keys of the `arguments`
    that are not None (CONFIG_KEYS), and every other key its default, except `num_blocks` on a
    CPU (CPU_KV_BLOCKS)."""
    values = {"model.checkpoint": checkpoint, **ONE_RANK}
    values.update({CONFIG_KEYS[name]: value for name, value in arguments.items() if value is not None})
    cfg = load_config(None, values=values)
    if "kv_cache.num_blocks" not in values and cfg.runtime.device == "cpu":
        cfg = load_config(None, values={**values, "kv_cache.num_blocks": CPU_KV_BLOCKS})
    return cfg


def _samples(given: SamplingParams | dict | None, n: int | None) -> list[SamplingParams]:
    """The parameters of each sample of one prompt: `given` (a dict holds SamplingParams'
    fields, and may hold "n"), `n` times."""
    if isinstance(given, dict):
        fields = {f.name for f in dataclasses.fields(SamplingParams)}
        unknown = sorted(set(given) - fields - {"n"})
        if unknown:
            raise ValueError(f"unknown sampling parameter {unknown[0]!r}; known: n, {', '.join(sorted(fields))}")
        given = dict(given)
        if n is not None and given.get("n", n) != n:
            raise ValueError(f"n = {n} and a dict with n = {given['n']}: give n once")
        n = given.pop("n", n)
        given = SamplingParams(**given)
    n = 1 if n is None else n
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise ValueError(f"n = {n!r}: must be an integer >= 1")
    return (given or SamplingParams()).samples(n)


def _salts(cache_salt: Salts, count: int) -> list[str | None]:
    """One cache_salt per prompt, each held to the request schema's own rule (the server's)."""
    salts = list(cache_salt) if isinstance(cache_salt, (list, tuple)) else [cache_salt] * count
    if len(salts) != count:
        raise ValueError(f"{count} prompts but {len(salts)} cache salts: give one, or one per prompt")
    for salt in salts:
        try:
            SamplingFields.model_validate({"cache_salt": salt})
        except ValidationError as e:
            raise ValueError(f"cache_salt = {salt!r:.40}: {e.errors()[0]['msg']}") from None
    return salts


def _generation(request: Request) -> Generation:
    p = request.params
    prompt_logprobs = list(request.prompt_logprobs) if p.prompt_logprobs is not None else None
    return Generation(list(request.prompt_token_ids), request.text, request.output_token_ids, request.finish_reason,
                      list(request.output_logprobs) if p.logprobs is not None else None, prompt_logprobs,
                      request.cached_tokens)


def _init_one_rank(cfg: LaminaConfig) -> None:
    """A one-rank process group on a free loopback port (the launchers' backends)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend=cfg.process_group_backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=timedelta(seconds=cfg.runtime.step_timeout_s))
