"""Tiny random LLaMA models saved by `transformers` itself, and their reference outputs.

The independent reference for every token-producing path: `transformers`' own
`LlamaForCausalLM` on the same weights, float32 on CPU. `save_tiny_llama` writes a real
Hugging Face checkpoint directory (save_pretrained, with the word-level tokenizer of
megatron_lamina/checkpoint/word_tokenizer.py and its chat template); `reference_greedy` runs
the HF model step by step (full forward each step, no cache) and returns the greedy tokens
and each step's logits.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from megatron_lamina.checkpoint.word_tokenizer import word_level_tokenizer

VOCAB = 256


def make_tokenizer():
    """The tests' word-level tokenizer: <unk> <s> </s> w0 .. w252, BOS prepended, a chat template."""
    return word_level_tokenizer(VOCAB)


def save_tiny_llama(directory: Path, tied: bool, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, **overrides,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init is small: make logits spread so greedy is not a tie
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    model.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


@contextlib.contextmanager
def one_thread():
    """One intra-op thread for a tiny model's forward passes, in this (the test) process: they are
    too small to split, and two threads' OpenMP spin-waits on a shared 2-core machine made every
    step wait for a descheduled sibling (the launched jobs run with OMP_NUM_THREADS=1 already)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference_generate(hf_dir: Path, prompts: list[list[int]], params: list, device: str = "cpu"):
    """Continue each prompt with the HF model, choosing each token from the HF logits with
    our sampler (greedy for temperature 0) and a generator seeded as the engine seeds it, on
    `device` (the engine samples where its logits are: a CUDA generator draws other numbers
    than a CPU one with the same seed). Returns (tokens, logits per step)."""
    from transformers import AutoModelForCausalLM

    from megatron_lamina.driver.sampling import sample_tokens

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens, logits = [], []
    for prompt, p in zip(prompts, params):
        ids, steps, generator = list(prompt), [], p.make_generator(device)
        with torch.no_grad(), one_thread():
            for _ in range(p.max_tokens):
                row = model(torch.tensor([ids])).logits[0, -1]
                steps.append(row)
                ids.append(sample_tokens(row.to(device)[None], [p], [generator])[0])
        tokens.append(ids[len(prompt):])
        logits.append(torch.stack(steps))
    return tokens, logits


def continue_with(model, prompt: list[int], steps: int, choose) -> list[int]:
    """A reference loop on a loaded HF model: `choose(raw float32 logits row, prompt, output so
    far)` picks each next token (full forward each step, no cache)."""
    output = []
    with torch.no_grad(), one_thread():
        for _ in range(steps):
            row = model(torch.tensor([prompt + output])).logits[0, -1].float()
            output.append(choose(row, prompt, output))
    return output


def penalized(row: torch.Tensor, prompt: list[int], output: list[int], presence: float = 0.0, frequency: float = 0.0,
              repetition: float = 1.0, bias: dict[int, float] | None = None) -> torch.Tensor:
    """The definitions, one token at a time in float32: OpenAI's logit_bias, presence and
    frequency penalties (over the output), HF's repetition penalty (over prompt and output)."""
    row = row.clone()
    for token, value in (bias or {}).items():
        row[token] += value
    for token in set(prompt) | set(output):
        row[token] = row[token] / repetition if row[token] > 0 else row[token] * repetition
    for token in set(output):
        row[token] -= frequency * output.count(token) + presence
    return row
