"""Fuzz the live service with schemathesis, from its own /openapi.json: whatever the input, never a 5xx.

Runs against the real app (uvicorn in a thread, real store, learned test model). Each operation is fuzzed with
inputs that fit the schema (positive) and inputs that break it (negative); examples are bounded so the file takes
well under a minute. (schemathesis' pytest loader relies on a pytest internal that pytest 9 removed, so the
operations are listed here, and a test checks that the list matches the schema.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, openapi
from schemathesis.checks import not_a_server_error

from indexer.api import create_app
from tests.live_server import make_corpus, serve

MAX_EXAMPLES = 50
NO_INPUT = ("GET /healthz", "GET /metrics")  # nothing to break: positive inputs only
OPERATIONS = [
    "GET /search",
    "POST /search",
    "POST /search/image",
    "GET /images/{image_id}",
    "GET /images/{image_id}/thumbnail",
    "GET /healthz",
    "GET /metrics",
    "POST /duplicates/scans",
    "GET /duplicates/scans/{scan_id}",
    "POST /duplicates/scans/{scan_id}/actions",
    "POST /clusters/runs",
    "GET /clusters/runs/{run_id}",
    "GET /clusters",
]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    corpus = make_corpus(tmp_path_factory.mktemp("fuzz"), shapes=12, archive=3, max_upload_mb=0.5)
    with serve(create_app(corpus.settings, corpus.store, corpus.model)) as url:
        yield openapi.from_url(f"{url}/openapi.json")
    corpus.store.close()


def operations(schema: Any) -> dict[str, Any]:
    return {op.label: op for op in (result.ok() for result in schema.get_all_operations())}


def test_every_operation_is_fuzzed(api_schema: Any) -> None:
    assert sorted(operations(api_schema)) == sorted(OPERATIONS)


@pytest.mark.parametrize(
    ("label", "mode"),
    [(label, GenerationMode.POSITIVE) for label in OPERATIONS]
    + [(label, GenerationMode.NEGATIVE) for label in OPERATIONS if label not in NO_INPUT],
    ids=str,
)
def test_no_input_gives_a_server_error(api_schema: Any, label: str, mode: GenerationMode) -> None:
    operation = operations(api_schema)[label]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case: Any) -> None:
        case.call_and_validate(checks=[not_a_server_error])

    fuzz()
