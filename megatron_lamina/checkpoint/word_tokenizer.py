"""A word-level tokenizer for models without a real one: random-weight checkpoints and tests.

`word_level_tokenizer(vocab_size)` builds a Hugging Face fast tokenizer with `tokenizers`:
ids 0, 1, 2 are `<unk>`, `<s>` (BOS, prepended on encoding), `</s>` (EOS), id i >= 3 is the
word `w{i-3}`; words split on whitespace and decode joined by spaces; a one-line chat
template. Used by tools/random_checkpoint.py (saved as the checkpoint's `tokenizer/`) and by
tests/tiny_models.py (the tests' tiny models).
"""

from __future__ import annotations

SPECIALS = ("<unk>", "<s>", "</s>")
BOS_ID, EOS_ID = 1, 2
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w9 {% endif %}")


def word_level_tokenizer(vocab_size: int):
    """A `PreTrainedTokenizerFast` of exactly `vocab_size` ids (at least 4)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= len(SPECIALS):
        raise ValueError(f"vocab size {vocab_size}: a word-level tokenizer needs more than {len(SPECIALS)} ids")
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + [f"w{i}" for i in range(vocab_size - len(SPECIALS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=CHAT_TEMPLATE)
