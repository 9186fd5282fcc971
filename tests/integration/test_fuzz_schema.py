"""Schema-driven fuzzing: schemathesis reads the router's own ``/openapi.json`` and generates
valid and invalid requests for every operation, over a real HTTP server.

Checks: no 5xx, status codes and content types the document declares, responses that
conform to the declared schemas (errors in OpenAI's shape), and invalid inputs rejected.
The router sits in front of a simulated engine, so accepted bodies are really served.
``CR_SCHEMA_EXAMPLES`` per operation (default 40 when ``CI=true``, else 20; about 0.1 s each).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from loadtest.engine import SimFleet
from tests.conftest import SIM_MODEL
from tests.support.router import ADMIN, running_router

EXAMPLES = int(os.environ.get("CR_SCHEMA_EXAMPLES") or (40 if os.environ.get("CI") == "true" else 20))


@pytest.fixture(scope="module")
def router_url() -> Iterator[str]:
    # max_model_len large enough that schema-valid max_tokens (up to 2^20) are served quickly
    # by the zero-time simulator or refused by it with a 400, never a long generation.
    with SimFleet(1, block_size=16, mode="process") as fleet, \
            running_router(backends=fleet.urls, tokenizer=str(SIM_MODEL), block_size=16,
                           max_body_bytes=64 * 1024, log_decisions=False) as router:
        yield router.url


def _operations(url: str) -> list[Any]:
    loaded = schemathesis.openapi.from_url(url + "/openapi.json")
    ops: list[Any] = [result.ok() for result in loaded.get_all_operations()]  # type: ignore[union-attr]
    return ops


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_conforms_to_the_router_openapi_document(router_url: str, mode: GenerationMode) -> None:
    operations = _operations(router_url)
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/debug/route"}
    session = requests.Session()  # one keep-alive connection for every case
    session.headers.update(ADMIN)  # /debug/route is off without the admin token
    seen: Counter[int] = Counter()
    for op in operations:
        if mode is GenerationMode.NEGATIVE and op.method.upper() == "GET":
            continue  # nothing to negate: these take no parameters or body

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            response = case.call(base_url=router_url, session=session, timeout=15)
            seen[response.status_code] += 1
            assert response.status_code < 500, (case.operation.label, case.body, response.status_code, response.text[:300])
            # Schema-valid is not always servable (token ids past the vocabulary, a model nobody
            # serves, a prompt past the context): that check alone is left out.
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        run()
    print(f"\nschemathesis {mode.value}: {sum(seen.values())} requests over {len(operations)} operations, "
          f"statuses {dict(sorted(seen.items()))}")
