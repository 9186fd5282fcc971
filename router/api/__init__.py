"""HTTP surface: OpenAI-compatible endpoints, operational and debug endpoints, error rendering.

``routes()`` is the whole URL map; every endpoint is wrapped by ``errors.guarded`` so a
RouterError becomes its status in OpenAI's shape and nothing else escapes as a bare 500.
"""

from __future__ import annotations

from starlette.routing import Route

from router.api import admin, openai
from router.api.errors import Endpoint, guarded


def hot_routes() -> dict[str, Endpoint]:
    """The POST endpoints every proxied request takes (unguarded; ``router.app.RouterApp``
    dispatches them before Starlette's middleware; ``routes()`` still lists them)."""
    return {"/v1/completions": openai.completions, "/v1/chat/completions": openai.chat_completions}  # type: ignore[dict-item]


def routes() -> list[Route]:
    return [
        Route("/v1/completions", guarded(openai.completions), methods=["POST"]),  # type: ignore[arg-type]
        Route("/v1/chat/completions", guarded(openai.chat_completions), methods=["POST"]),  # type: ignore[arg-type]
        Route("/v1/models", guarded(openai.models), methods=["GET"]),
        Route("/health", admin.health, methods=["GET"]),
        Route("/ready", guarded(admin.ready), methods=["GET"]),
        Route("/metrics", guarded(admin.metrics), methods=["GET"]),
        Route("/debug/route", guarded(admin.debug_route), methods=["POST"]),
        Route("/openapi.json", admin.openapi, methods=["GET"]),
    ]
