"""Text in and out: prompts and chat messages to token ids, token ids to text (driver only).

Wraps the checkpoint's Hugging Face tokenizer (`tokenizer/` of the canonical checkpoint):
plain prompts are encoded with the tokenizer's own special-token rules, chat messages
through its chat template with the generation prompt appended. Output text is the decode of
all generated tokens with special tokens skipped; `find_stop` cuts it at the first stop
string.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer


class TextCodec:
    def __init__(self, checkpoint_dir: str | Path):
        self.tokenizer = AutoTokenizer.from_pretrained(str(Path(checkpoint_dir) / "tokenizer"))

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
