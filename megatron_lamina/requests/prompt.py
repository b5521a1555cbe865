"""What a caller asks the engine for, turned into token ids and checked against the limits.

`PromptInput` is one generation as a caller gives it (a plain prompt, chat messages, or
token ids, with its sampling settings and the caller's id for it): a plain dataclass, so the
HTTP front end can build it in its own process and send it to the engine's. `prompt_ids`
tokenizes it and checks the ids; `Capacity` (the model's context and one attention shard's
KV cache) is what the scheduler checks a request against, and what the front end checks a
prompt against before admitting it, so both refuse the same prompts with the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_lamina.requests.sampling_params import SamplingParams

if TYPE_CHECKING:  # the codec is the caller's: this module stays torch-free
    from megatron_lamina.requests.tokenizer import TextCodec


@dataclass
class PromptInput:
    """One generation: a plain prompt, chat messages, or token ids (exactly one of them)."""

    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_token_ids: list[int] | None = None
    params: SamplingParams | None = None
    user_id: object = None
    cache_salt: str | None = None  # only prompts with the same salt share prefix-cache blocks


def is_token_ids(value) -> bool:
    """A non-empty list of ints (not bools), checked at C speed: prompts are thousands of ids."""
    return isinstance(value, list) and bool(value) and set(map(type, value)) == {int}


def prompt_ids(codec: TextCodec, item: PromptInput, vocab_size: int) -> list[int]:
    """The prompt's token ids; ValueError when it is empty or an id is not a token."""
    if item.prompt_token_ids is not None:
        ids = list(item.prompt_token_ids)
    elif item.messages is not None:
        ids = codec.encode_chat(item.messages)
    else:
        ids = codec.encode_prompt(item.prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    if not is_token_ids(ids) or min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size})")
    return ids


@dataclass(frozen=True)
class Capacity:
    """The longest prompt that can ever run: the model's context, and one shard's KV cache."""

    max_model_len: int
    num_blocks: int
    block_size: int

    def check(self, num_tokens: int) -> None:
        """ValueError naming the limit when a prompt of `num_tokens` could never run."""
        if num_tokens >= self.max_model_len:
            raise ValueError(f"prompt has {num_tokens} tokens; the model's context is {self.max_model_len} "
                             "tokens and generation needs at least one more")
        if -(-(num_tokens + 1) // self.block_size) > self.num_blocks:
            raise ValueError(f"prompt has {num_tokens} tokens; one attention shard's KV cache holds "
                             f"{self.num_blocks * self.block_size} tokens (kv_cache.num_blocks x "
                             "kv_cache.block_size)")
