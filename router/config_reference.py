"""The config file's reference, generated from the schema in ``router.config``.

``python -m router.config_reference > docs/config.md`` writes it; a test fails when the
committed page and the schema disagree, so defaults and their reasons are written once,
next to the field they set.
"""

from __future__ import annotations

import sys
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from router.config import RouterConfig


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "`{}`" if value == {} else "`[]`" if value == [] else f"`{value}`" if not isinstance(value, BaseModel) else "(section)"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{field.default!r}`" if field.default is not None else "unset"


def _type(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = (text or str(annotation)).replace("typing.", "").replace("router.config.", "")
    return text.replace(" | ", " or ")


def _section(model: type[BaseModel], path: str, out: list[str]) -> None:
    nested: list[tuple[str, type[BaseModel]]] = []
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.append((name, ann))
            continue
        doc = " ".join((field.description or "").split())
        rows.append(f"| `{name}` | {_type(ann)} | {_default(field)} | {doc} |")
    out += [f"## `{path}`" if path else "## top level", "", "| key | type | default | meaning |", "|---|---|---|---|",
            *rows, ""]
    for name, sub in nested:
        _section(sub, f"{path}.{name}" if path else name, out)


def reference() -> str:
    out = ["# Config reference", "",
           "Generated from `router/config.py` by `python -m router.config_reference`; do not edit by hand.",
           "Unknown keys are an error. Flags of `cache-router serve` override the file; "
           "`CACHE_ROUTER_CONFIG` and `CACHE_ROUTER_REDIS_URL` stand in for `--config` and `--redis-url`.",
           "List entries: `backends[]` take the keys of `BackendConfig`, `models.<name>` those of `ModelConfig`,",
           "`auth.api_keys[]` those of `ApiKeyConfig` (below).", ""]
    _section(RouterConfig, "", out)
    from router.config import ApiKeyConfig, BackendConfig, ModelConfig

    for model, path in ((BackendConfig, "backends[]"), (ModelConfig, "models.<name>"), (ApiKeyConfig, "auth.api_keys[]")):
        _section(model, path, out)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
