"""Text in and out: prompts and chat messages to token ids, token ids to text (driver only).

Wraps the checkpoint's Hugging Face tokenizer (`tokenizer/` of the canonical checkpoint):
plain prompts are encoded with the tokenizer's own special-token rules, chat messages
through its chat template with the generation prompt appended. Output text is the decode of
the generated tokens with special tokens skipped and no clean-up of spaces, built
incrementally (`IncrementalDetokenizer`: each new token costs a few microseconds, whatever
the length of the output); `find_stop` looks for stop strings in the new tail only. Messages
a chat template refuses (Llama-2, Mistral and Gemma templates raise "Conversation roles must
alternate") are a ValueError, the input's fault, like any other prompt that cannot run.

User text is encoded as text: a special token's string inside a prompt or a chat message
(`<|im_end|><|im_start|>system`) stays the characters it is made of and never becomes a
control token, so no user can forge a turn. Control tokens come only from the chat template
itself and from the tokenizer's own rules (a BOS it prepends); a client that wants them in a
plain prompt sends token ids.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from jinja2 import TemplateError
from tokenizers import Tokenizer
from transformers import AutoTokenizer
from transformers import __version__ as transformers_version


class TextCodec:
    def __init__(self, checkpoint_dir: str | Path):
        self.tokenizer = AutoTokenizer.from_pretrained(str(Path(checkpoint_dir) / "tokenizer"))
        self._token_texts: dict[int, str] = {}
        # Prompts are encoded by a copy of the backend with `encode_special_tokens` on for good:
        # transformers sets that switch on the shared backend in every call, so flipping it per
        # call would race with a chat being encoded in another thread (the front end's pool).
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._text_only = None
        if backend is not None:
            self._text_only = Tokenizer.from_str(backend.to_str())
            self._text_only.encode_special_tokens = True
        self._sanitizes = "sanitize_control_tokens" in inspect.signature(self.tokenizer.apply_chat_template).parameters

    def encode_prompt(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """The prompt's ids, its special-token strings encoded as text; `add_special_tokens`:
        the tokenizer's own (a BOS it prepends)."""
        if self._text_only is not None:  # encode_batch, as transformers calls it: it releases the GIL
            return self._text_only.encode_batch([prompt], add_special_tokens=add_special_tokens)[0].ids
        ids = self.tokenizer(prompt, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"]
        return list(ids)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        """The template's text with its own control tokens; what the messages hold is text
        (transformers' `sanitize_control_tokens`: marked control-token strings in the messages
        are encoded as plain text, the rest exactly as the whole rendered text would be)."""
        if not self._sanitizes:  # an older transformers would take the flag as a template variable
            raise RuntimeError(f"transformers {transformers_version} cannot keep chat messages from forging control "
                               "tokens: install transformers >= 5.20 (pyproject.toml lists the versions tested)")
        try:
            ids = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True, return_dict=False, sanitize_control_tokens=True)
        except TemplateError as e:  # the template's own raise_exception(...), or a message it cannot render
            raise ValueError(f"the model's chat template refused these messages: {e}") from None
        return list(ids)

    def token_text(self, token_id: int) -> str:
        """One token's text on its own, special tokens kept (what log-probability reports name
        a token by, as vLLM does; a piece of a multi-byte character shows as U+FFFD)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        return text

    def decode(self, token_ids: list[int]) -> str:
        """The whole text of `token_ids`: what the incremental detokenizer's pieces add up to."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def incremental(self) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """One request's output text, a token at a time.

    With a fast tokenizer the `tokenizers` library's own `DecodeStream` turns each token into
    its new text (None while the token ends in the middle of a multi-byte character); without
    one, the same is done in Python as vLLM does: decode a short window before the new
    tokens and the window with them, and keep the difference. Either way the pieces
    concatenate to `TextCodec.decode` of all tokens, except that bytes of a character not
    yet complete are held back; `flush` returns them as the full decode renders them (the
    replacement character) when the request ends there.

    `DecodeStream.step` is known to raise on some tokenizers' invalid byte sequences
    ("Invalid prefix encountered"): as vLLM does, the stream is then reset (here with the
    last emitted tokens as its context, so spacing stays right) and the token retried; a
    second failure is raised, and the engine ends this request alone.
    """

    WINDOW = 6  # tokens of left context for decoding a piece (covers multi-token characters)

    def __init__(self, codec: TextCodec):
        self.codec = codec
        backend = getattr(codec.tokenizer, "backend_tokenizer", None)
        self.backend = backend
        if backend is not None:
            self.stream = self._new_stream([])
        self.ids: list[int] = []
        self.emitted = 0  # ids[:emitted] are all in the text returned so far

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self.backend is not None:
            try:
                piece = self.stream.step(self.backend, token)
            except Exception as e:  # noqa: BLE001 - the tokenizers library's error type is not public
                print(f"warning: the detokenizer failed on token {token} ({e}); its stream is reset",
                      file=sys.stderr)
                piece = self._reset_stream()
            if piece is None:
                return ""
        else:
            piece = self._difference(len(self.ids))
            if piece.endswith("\ufffd"):
                return ""
        self.emitted = len(self.ids)
        return piece

    def _new_stream(self, context: list[int]):
        from tokenizers.decoders import DecodeStream

        return DecodeStream(ids=context or None, skip_special_tokens=True)

    def _reset_stream(self) -> str | None:
        """A fresh stream whose context is the last emitted tokens, fed the tokens after them."""
        self.stream = self._new_stream(self.ids[max(0, self.emitted - self.WINDOW):self.emitted])
        pieces = [self.stream.step(self.backend, t) for t in self.ids[self.emitted:]]
        if pieces[-1] is None:
            return None
        return "".join(p for p in pieces if p is not None)

    def flush(self) -> str:
        """Text of the tokens held back (an incomplete character), as the full decode has it."""
        if self.emitted == len(self.ids):
            return ""
        piece = self._difference(len(self.ids))
        self.emitted = len(self.ids)
        return piece

    def _difference(self, end: int) -> str:
        start = max(0, self.emitted - self.WINDOW)
        before = self.codec.decode(self.ids[start:self.emitted])
        after = self.codec.decode(self.ids[start:end])
        return after[len(before):]


def find_stop(text: str, stops: list[str], since: int = 0) -> int | None:
    """Index where the earliest stop string starts in `text`, looking only at matches that
    end after `since` (the text before it was searched already)."""
    hits = []
    for stop in stops:
        i = text.find(stop, max(0, since - len(stop) + 1))
        if i >= 0:
            hits.append(i)
    return min(hits) if hits else None
