"""Prompt -> tokens -> chained block keys. Pure: no I/O, no clock, no global state."""

from router.hashing.keys import chain_keys, first_link_seed, prompt_keys
from router.hashing.tokenizer import ModelTokenizer

__all__ = ["ModelTokenizer", "chain_keys", "first_link_seed", "prompt_keys"]
