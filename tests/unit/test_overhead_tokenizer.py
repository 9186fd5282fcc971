"""The router's fast tokenizer call (``encode_batch_fast``, no offsets, GIL released) gives
exactly the ids of the library's plain ``encode``, with and without special tokens, on
varied texts (unicode, whitespace runs, special-token strings, long prompts)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from loadtest.bench.prompts import completion_body
from loadtest.bench.targets import MODEL_DIR
from router.hashing.tokenizer import ModelTokenizer

_MT = ModelTokenizer.from_dir(MODEL_DIR)
_PLAIN = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
_PIECES = ["the", "cache", "Router", "x1", "42", "año", "naïve", "I'm", "--", "!!", "\n", "\n\n", "  ", "\t",
           "日本", "😀", "don't", "3.14", "<s>", "</s>", "<|im_start|>", " "]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_PIECES) | st.text(max_size=8), max_size=120), st.booleans())
def test_fast_ids_equal_plain_encode(parts: list[str], special: bool) -> None:
    text = " ".join(parts)
    assert _MT._ids(text, add_special_tokens=special) == _PLAIN.encode(text, add_special_tokens=special).ids


def test_long_prompt_through_segment_cache_equals_plain_encode() -> None:
    import json

    text = json.loads(completion_body(8000))["prompt"].replace("__UNIQUE__", "7-42")
    assert _MT.encode(text, add_special_tokens=True) == _PLAIN.encode(text, add_special_tokens=True).ids
    assert _MT.encode(text, add_special_tokens=False) == _PLAIN.encode(text, add_special_tokens=False).ids
