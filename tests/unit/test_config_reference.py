"""The config reference is generated from the schema; the committed page must match it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from router.config import RouterConfig, load_config
from router.config_reference import reference

ROOT = Path(__file__).resolve().parents[2]


def test_docs_config_md_is_generated_from_the_schema() -> None:
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == reference(), "regenerate: python -m router.config_reference > docs/config.md"


def test_every_top_level_key_is_documented() -> None:
    page = reference()
    for name in RouterConfig.model_fields:
        assert f"`{name}`" in page


def test_readme_config_examples_are_valid(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    assert blocks, "the README shows a config file"
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(block)
        load_config(path)  # raises ConfigError on an unknown key or a bad value
        run = subprocess.run([sys.executable, "-m", "router", "check-config", str(path)], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
