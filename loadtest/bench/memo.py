"""Time the keys of benchmark prompts through the chain memo: a known prefix, a unique tail.

``python -m loadtest.bench.memo [--sizes 100,2000,8000,32000] [--batches 15]`` prints, per
prompt size, the best over batches of 100 prompts of the time ``ModelTokenizer.encode_keys``
takes (the router's ``tokenize`` stage, keys included), after one prompt has filled the memo.
The prompts are ``loadtest.overhead``'s (``loadtest.bench.prompts``), so the figures line up
with the overhead benchmark's stage histograms.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from loadtest.bench.prompts import completion_body
from loadtest.bench.targets import MODEL_DIR
from router.hashing.keys import first_link_seed
from router.hashing.tokenizer import ModelTokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.memo", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100,2000,8000,32000")
    p.add_argument("--batches", type=int, default=15)
    args = p.parse_args(argv)
    mt = ModelTokenizer.from_dir(MODEL_DIR)
    seed = first_link_seed("sim-model", None)
    serial = 0
    for size in (int(s) for s in args.sizes.split(",")):
        prompt = json.loads(completion_body(size))["prompt"]
        mt.encode_keys(prompt, add_special_tokens=True, block_size=16, seed=seed)
        best = float("inf")
        for _ in range(args.batches):
            texts = [prompt.replace("__UNIQUE__", f"u{(serial := serial + 1):08d}x") for _ in range(100)]
            t0 = time.perf_counter()
            for text in texts:
                mt.encode_keys(text, add_special_tokens=True, block_size=16, seed=seed)
            best = min(best, (time.perf_counter() - t0) / len(texts))
        print(f"{size:>6} tokens: {best * 1e6:7.1f} µs per prompt (best of {args.batches} batches of 100)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
