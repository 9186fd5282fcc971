"""The word-level encoder (router.hashing.words) gives exactly the library's ids on every text
it accepts, for the GPT-2 split and for regex ``Split`` tokenizers (Llama 3, GPT-4o style),
declines tokenizers it cannot follow, and hands non-ASCII text, added tokens and long texts back
to the library."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from loadtest.bench.targets import MODEL_DIR
from router.hashing import words
from router.hashing.tokenizer import ModelTokenizer
from router.hashing.words import WordEncoder, ascii_pattern

LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CORPUS = ["The cache router's block index isn't 12345 tokens; we'll see 3.14!\n\n  ok",
           "def f(x):\n\treturn {'k': x}  # DON'T\r\n", "Hello, World! I'm here -- 2026-12-04T21:00Z"] * 30


def _trained(pre: pre_tokenizers.PreTokenizer, *, normalizer: normalizers.Normalizer | None = None,
             dropout: float | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE(dropout=dropout, ignore_merges=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>", "<|im_start|>"])
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


_SIM = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
_TOKENIZERS = {
    "sim-model (GPT-2 ByteLevel)": _SIM,
    "Llama 3 split": _trained(_split_then_bytes(LLAMA3)),
    "GPT-4o split": _trained(_split_then_bytes(O200K)),
}
_ENCODERS = {name: WordEncoder.for_tokenizer(tok, max_chars=4096) for name, tok in _TOKENIZERS.items()}
_PIECES = ["the", "Cache", "ROUTER", "x1", "42", "1234567", "I'm", "IT'S", "we'll", "'ve", "--", "!!", "a.b", "\n",
           "\n\n", " \n", "\r\n", "  ", "\t", "\x0b", "\x1c", "\x7f", "<s>", "<|im_start|>", "'", "{\"k\": [1]}", "/"]
_ascii = st.lists(st.sampled_from(_PIECES) | st.text(string.printable + "\x00\x1c\x1f\x7f", max_size=6),
                  max_size=60).map("".join)


def test_the_supported_tokenizers_are_accepted() -> None:
    assert all(_ENCODERS.values()), [name for name, enc in _ENCODERS.items() if enc is None]


@pytest.mark.parametrize("name", list(_TOKENIZERS))
@settings(max_examples=300, deadline=None)
@given(text=_ascii)
def test_ids_equal_the_library(name: str, text: str) -> None:
    enc = _ENCODERS[name]
    assert enc is not None
    ids = enc.encode(text)
    library = _TOKENIZERS[name].encode(text, add_special_tokens=False).ids
    assert ids == library  # added tokens included: the pieces between them are split on their own
    assert enc.encode(text) == library  # again, from the piece cache


def test_the_router_tokenizer_uses_it_and_still_matches() -> None:
    mt = ModelTokenizer.from_dir(MODEL_DIR)
    assert mt._words is not None
    text = " request 12345 please answer briefly"
    assert mt.encode(text, add_special_tokens=True) == _SIM.encode(text, add_special_tokens=True).ids
    assert " request" in mt._words._cache and " briefly" in mt._words._cache  # it went through the pieces


def test_texts_it_does_not_take_go_back_to_the_library() -> None:
    enc = WordEncoder.for_tokenizer(_SIM, max_chars=64)
    assert enc is not None
    assert enc.encode("naïve café") is None
    assert enc.encode("hello <s> world") == _SIM.encode("hello <s> world", add_special_tokens=False).ids
    assert enc.encode("x" * 65) is None
    assert enc.encode("x" * 64) == _SIM.encode("x" * 64, add_special_tokens=False).ids


@pytest.mark.parametrize("case", ["metaspace", "normalizer", "dropout", "truncation", "prefix space", "digits"])
def test_tokenizers_it_cannot_follow_are_declined(case: str) -> None:
    if case == "metaspace":
        tok = _trained(pre_tokenizers.Metaspace())
    elif case == "normalizer":
        tok = _trained(_split_then_bytes(LLAMA3), normalizer=normalizers.NFKC())
    elif case == "dropout":
        tok = _trained(_split_then_bytes(LLAMA3), dropout=0.1)
    elif case == "truncation":
        tok = _trained(_split_then_bytes(LLAMA3))
        tok.enable_truncation(8)
    elif case == "prefix space":
        tok = _trained(pre_tokenizers.ByteLevel(add_prefix_space=True))
    else:
        tok = _trained(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)]))
    assert WordEncoder.for_tokenizer(tok) is None


def test_its_self_check_catches_a_split_that_differs() -> None:
    tok = _TOKENIZERS["Llama 3 split"]
    good = _ENCODERS["Llama 3 split"]
    assert good is not None and good.agrees_with(tok)
    # Digits in runs of any length instead of three: the library splits "1234567" differently.
    wrong = WordEncoder(tok, words.re.compile(ascii_pattern(LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}+")) or "",
                                              words.re.ASCII), {})
    assert not wrong.agrees_with(tok)


@pytest.mark.parametrize(("pattern", "expected"), [
    (r" ?\p{L}+", r" ?[A-Za-z]+"),
    (r"[^\s\p{L}\p{N}]+", r"[^\sA-Za-z0-9]+"),
    (r"[\p{Lu}\p{Lt}]*\p{Lo}", r"[A-Z]*(?!)"),
    (r"\P{L}", None),  # negated property
    (r"\p{P}+", None),  # ASCII members without a simple range
    (r"[\p{Lo}\p{M}]+", None),  # a class the rewrite leaves empty
])
def test_patterns_are_rewritten_for_ascii_or_declined(pattern: str, expected: str | None) -> None:
    assert ascii_pattern(pattern) == expected


def test_the_piece_cache_starts_over_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(words, "MAX_WORDS", 8)
    enc = WordEncoder.for_tokenizer(_SIM)
    assert enc is not None
    for i in range(40):
        text = f" id {i} and {i * 7}"
        assert enc.encode(text) == _SIM.encode(text, add_special_tokens=False).ids
        assert len(enc._cache) <= 8


def test_unique_short_tails_skip_the_segment_cache() -> None:
    """A prompt's unique tail would only evict shared chunks from the segment cache."""
    from router.hashing.keys import first_link_seed, prompt_keys

    mt = ModelTokenizer.from_dir(MODEL_DIR)
    cache = mt.segment_cache
    assert cache is not None
    seed = first_link_seed("m", None)
    prefix = "You are a helpful assistant. " * 120
    sizes = []
    for i in range(20):
        text = prefix + f"request {i}: please answer briefly"
        out = mt.encode_keys(text, add_special_tokens=False, block_size=16, seed=seed)
        assert out is not None and out.keys == prompt_keys(_SIM.encode(text, add_special_tokens=False).ids, 16, "m", None)
        sizes.append(len(cache._lru))
    assert sizes[-1] == sizes[0]


def test_an_added_token_that_takes_whitespace_goes_to_the_library() -> None:
    from tokenizers import AddedToken

    tok = _trained(_split_then_bytes(LLAMA3))
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    enc = WordEncoder.for_tokenizer(tok)
    assert enc is not None
    assert enc.encode("fill the <mask> here") is None  # the library also takes the space before it
    text = "hello <s> world"
    assert enc.encode(text) == tok.encode(text, add_special_tokens=False).ids


def test_chat_prompts_take_the_fast_path() -> None:
    mt = ModelTokenizer.from_dir(MODEL_DIR)
    assert mt._words is not None
    text = mt.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "question 7: why?"}])
    assert "<|im_start|>" in text
    assert mt._words.encode(text) == _SIM.encode(text, add_special_tokens=False).ids
