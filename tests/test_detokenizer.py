"""Incremental detokenization (requests/tokenizer.py) against decoding the whole output at once.

On the default model's tokenizer (SmolLM2's byte-level BPE, in tools/setup.sh's conversion of
the GGUF the project ships) and on the tests' word-level one: random token streams (byte tokens that split
multi-byte characters, special tokens, anything of the vocabulary), and the tokens of text
full of multi-byte characters. The pieces `push` returns, plus `flush` at the end, must be
exactly `TextCodec.decode` of all tokens, and no piece may end inside a character. The
Python fallback (a tokenizer without a Rust backend) must agree too.
"""

from __future__ import annotations

import random

import pytest
from server_proc import setup_checkpoint

from megatron_lamina.requests.tokenizer import TextCodec, find_stop

TEXTS = ["naïve café — 東京タワー 🚀🎉 Ünïcödé ½ ‰ €", "emoji only: 👩‍👩‍👧‍👦🧑🏽‍🚀", "plain ascii, then 한국어 and ελληνικά."]


def _check(codec: TextCodec, ids: list[int], python_fallback: bool = False) -> None:
    detokenizer = codec.incremental()
    if python_fallback:
        detokenizer.backend = None
    pieces = [detokenizer.push(t) for t in ids]
    pieces.append(detokenizer.flush())
    for piece in pieces[:-1]:
        assert not piece.endswith("\ufffd") or codec.decode(ids).count("\ufffd"), piece
    assert "".join(pieces) == codec.decode(ids), ids


@pytest.fixture(scope="module")
def smollm2_codec() -> TextCodec:
    checkpoint = setup_checkpoint()
    return TextCodec(checkpoint)


@pytest.mark.parametrize("python_fallback", [False, True])
def test_random_streams_of_the_default_tokenizer(smollm2_codec, python_fallback):
    rng = random.Random(0)
    vocab = len(smollm2_codec.tokenizer)
    byte_tokens = [i for i in range(vocab) if len(smollm2_codec.tokenizer.convert_ids_to_tokens(i)) == 1]
    for _ in range(150 if not python_fallback else 40):
        n = rng.randrange(1, 60)
        # Half the tokens single bytes (they split multi-byte characters), half anything.
        ids = [rng.choice(byte_tokens) if rng.random() < 0.5 else rng.randrange(vocab) for _ in range(n)]
        _check(smollm2_codec, ids, python_fallback)


def test_multibyte_text_of_the_default_tokenizer(smollm2_codec):
    for text in TEXTS:
        ids = smollm2_codec.encode_prompt(text)
        _check(smollm2_codec, ids)
        assert smollm2_codec.decode(ids) == text
        for cut in range(1, len(ids)):  # an output may end anywhere, inside a character too
            _check(smollm2_codec, ids[:cut])


def test_word_level_tokenizer(tiny_models):
    codec = TextCodec(tiny_models["untied"].canonical_dir)
    rng = random.Random(1)
    for _ in range(50):
        _check(codec, [rng.randrange(len(codec.tokenizer)) for _ in range(rng.randrange(1, 30))])


def test_stop_strings_in_the_new_tail_only():
    text = "alpha beta gamma"
    assert find_stop(text, ["beta"]) == 6
    # A stop string that straddles the old/new boundary is found from the new tail.
    assert find_stop(text, ["a gam"], since=len("alpha beta g")) == 9
    # One that ended before `since` was seen by an earlier search: not looked at again.
    assert find_stop(text, ["alpha"], since=len("alpha beta")) is None
    # "a b" lies inside the searched "alpha b"; "beta" ends after it: the earliest new match.
    assert find_stop(text, ["beta", "a b"], since=len("alpha b")) == 6
