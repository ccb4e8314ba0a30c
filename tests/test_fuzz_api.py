"""Fuzz the live service with schemathesis, from its own /openapi.json: whatever the input, never a 5xx.

Runs against the real app (uvicorn in a thread, real store, learned test model). Each operation is fuzzed with
inputs that fit the schema (positive) and inputs that break it (negative); examples are bounded so the file takes
well under a minute. (schemathesis' pytest loader relies on a pytest internal that pytest 9 removed, so the
operations are listed here, and a test checks that the list matches the schema.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, openapi
from schemathesis.checks import not_a_server_error

from indexer.api.routes import create_app
from tests.support.live_server import make_corpus, serve

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


@pytest.fixture
def scanned(tmp_path: Path) -> Iterator[tuple[Any, str, int]]:
    """A corpus of its own (the actions may move or delete its files), served, with a finished similar-tier scan."""
    corpus = make_corpus(tmp_path, shapes=24, archive=0)
    try:
        with serve(create_app(corpus.settings, corpus.store, corpus.model)) as url:
            job = httpx.post(f"{url}/duplicates/scans", json={"tier": "similar", "threshold": 0.9}).json()
            for _ in range(600):
                if httpx.get(f"{url}/duplicates/scans/{job['id']}").json()["state"] != "running":
                    break
                time.sleep(0.05)
            groups = httpx.get(f"{url}/duplicates/scans/{job['id']}").json()["groups"]
            assert groups > 0
            yield openapi.from_url(f"{url}/openapi.json"), job["id"], groups
    finally:
        corpus.store.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_actions_on_a_real_scan_give_no_server_error(scanned: tuple[Any, str, int], mode: GenerationMode) -> None:
    schema, scan_id, groups = scanned
    operation = operations(schema)["POST /duplicates/scans/{scan_id}/actions"]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case: Any) -> None:
        case.path_parameters = {"scan_id": scan_id}
        if mode == GenerationMode.POSITIVE:  # aim the random selections at the scan's real groups
            for selection in case.body["groups"]:
                selection["group"] %= groups
                selection.pop("keeper", None)  # a random id is never one of the group's
        statuses.append(case.call_and_validate(checks=[not_a_server_error]).status_code)

    statuses: list[int] = []
    fuzz()
    if mode == GenerationMode.POSITIVE:  # some inputs got through to the plan (and the files), not only to 4xx
        assert 200 in statuses, sorted(set(statuses))
