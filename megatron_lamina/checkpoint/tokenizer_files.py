"""Tokenizers given with `--tokenizer` for sources that carry none (Megatron, DeepSpeed).

Megatron checkpoints name their tokenizer only in their training arguments; DeepSpeed ones
have none at all. `TokenizerSource(path)` accepts a Hugging Face tokenizer directory or a
SentencePiece `tokenizer.model` (Megatron's GPTSentencePieceTokenizer / Llama2Tokenizer),
and `save(output_dir)` writes it as Hugging Face tokenizer files into the canonical
checkpoint. A SentencePiece model becomes a `LlamaTokenizer` (transformers converts it with
`protobuf`, see the `convert` extra); `add_bos` says whether encoding adds BOS, as the
Megatron tokenizer the model was trained with did.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from functools import cached_property
from pathlib import Path

from megatron_lamina.checkpoint.errors import CheckpointInputError

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class TokenizerSource:
    def __init__(self, path: str | Path, add_bos: bool | None = None):
        self.path = Path(path).absolute()
        self.add_bos = add_bos
        if self.path.is_dir():
            if not any((self.path / name).is_file() for name in HF_TOKENIZER_FILES):
                raise CheckpointInputError(
                    self.path, f"no tokenizer files ({' / '.join(HF_TOKENIZER_FILES)}) in this directory"
                )
            self.kind = "hf"
        elif self.path.is_file():
            self.kind = "sentencepiece"
        else:
            raise CheckpointInputError(
                self.path, "no such tokenizer (expected a SentencePiece .model file or a Hugging Face tokenizer dir)"
            )

    @cached_property
    def tokenizer(self):
        """The transformers tokenizer, loaded once."""
        from transformers import AutoTokenizer, LlamaTokenizer

        try:
            if self.kind == "hf":
                return AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            if importlib.util.find_spec("google.protobuf") is None:
                raise CheckpointInputError(
                    self.path, "converting a SentencePiece model needs protobuf: pip install protobuf"
                )
            # transformers converts a SentencePiece model found as tokenizer.model in a directory.
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copyfile(self.path, Path(tmp) / "tokenizer.model")
                kwargs = {} if self.add_bos is None else {"add_bos_token": self.add_bos}
                return LlamaTokenizer.from_pretrained(tmp, local_files_only=True, **kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointInputError(self.path, f"cannot load as a {self.kind} tokenizer ({e})") from None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos]

    def save(self, output_dir: Path) -> None:
        self.tokenizer.save_pretrained(str(output_dir))
