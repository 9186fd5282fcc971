"""``serve`` freezes what start-up allocated (router.app.create_app(freeze_gc=True)), so a full
garbage collection no longer scans the modules, tokenizers and the app while requests wait.
Checked in a fresh interpreter: freezing is per process, and tests share theirs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.servers import env_without_proxies, free_port

SCRIPT = """
import asyncio, gc, json, sys, time
from router.app import create_app
from router.config import load_config

async def main(freeze):
    config = load_config(None, tokenizer=sys.argv[1], backends=[{"url": sys.argv[2]}], log_decisions=False)
    app = create_app(config, freeze_gc=freeze)
    async with app.router.lifespan_context(app):
        t0 = time.perf_counter()
        gc.collect()
        return {"frozen": gc.get_freeze_count(), "full_collection_ms": 1000 * (time.perf_counter() - t0)}

print(json.dumps([asyncio.run(main(False)), asyncio.run(main(True))]))
"""


def test_serve_freezes_start_up_objects(sim_model_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(sim_model_dir), f"http://127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=120, env=env_without_proxies(), check=True)
    plain, frozen = json.loads(out.stdout.strip().splitlines()[-1])
    assert plain["frozen"] == 0
    assert frozen["frozen"] > 10_000  # modules, functions, the tokenizer's template, the app
    print(f"full collection after start-up: {plain['full_collection_ms']:.1f} ms plain, "
          f"{frozen['full_collection_ms']:.1f} ms frozen")
