"""Build a tiny random Llama that a real vLLM can serve, with the project's shared tokenizer.

Run with .venv-vllm's python (it needs torch and transformers, which the router's venv
does not have): ``.venv-vllm/bin/python tests/vllm/make_tiny_model.py OUT_DIR``.
The weights are random (fixed seed): the tests care about the engine's prefix cache
and tokenization, never about what the model says. The tokenizer files are copied
unchanged from ``loadtest/models/sim-model``, so router and engine read the same
tokenizer and chat template, exactly as in production.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SIM_MODEL = Path(__file__).resolve().parents[2] / "loadtest" / "models" / "sim-model"
SEED = 1234


def build(out: Path, tokenizer_dir: Path = SIM_MODEL) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=8192,  # the shared tokenizer's 8192 ids
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: make_tiny_model.py OUT_DIR", file=sys.stderr)
        return 2
    build(Path(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
