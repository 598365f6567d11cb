"""Schemathesis against the service's own OpenAPI schema: generated requests (valid and invalid) never get a 5xx.

Bounded: a few examples per operation, tight service limits (64x64 pixels, 4 steps) so that accepted jobs are
cheap, loopback only. The same check as a command: see docs/serving.md ("Checking the API").
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from test_server_support import load_engines, make_config, running  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(tiny_schnell_folder, tmp_path_factory):
    engines = load_engines(tiny_schnell_folder)
    limits = {"max_pixels": 64 * 64, "max_steps": 4, "max_n": 2, "wait_s": 2, "max_queue": 1000}
    config = make_config(tmp_path_factory.mktemp("schema"), engines, limits=limits)
    with running(config, engines) as (url, _):
        yield schemathesis.openapi.from_url(url + "/openapi.json")


def _fuzz(operation, mode: str, tested: set) -> None:
    """Up to 10 generated requests for one operation; any 5xx fails."""
    from schemathesis.generation import GenerationMode

    @given(case=operation.as_strategy(GenerationMode(mode)))
    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        response = case.call(timeout=30)
        case.validate_response(response, checks=[not_a_server_error])
        tested.add(operation.label)

    check()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_errors(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 9  # every documented route is exercised
    tested: set[str] = set()
    for operation in operations:
        try:
            _fuzz(operation, mode, tested)
        except Unsatisfiable:
            assert mode == "negative"  # an operation without constrained inputs has no invalid request (/healthz)
    # Negative cases exist only where a schema constrains something: the three request bodies.
    assert len(tested) >= (len(operations) if mode == "positive" else 3), sorted(tested)
