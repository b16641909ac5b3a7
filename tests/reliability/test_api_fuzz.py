"""Schemathesis against the gateway's own OpenAPI schema (/openapi.json), valid and invalid input alike: no request
gets a 5xx, and every 4xx carries OpenAI's error body {"error": {"message", "type", "param", "code"}}."""

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from gateway_harness import GatewayServer, WorkerProcess, gateway_config
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from reliability_harness import Sizes

# A worker of its own: a context of 64 tokens keeps every valid generation short, whatever max_tokens and n are drawn.
FUZZ_WORKER_ARGS = ("--max-context-length", "64", "--max-num-seqs", "16")
POST_ROUTES = ("/v1/chat/completions", "/v1/completions", "/generate")
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def fuzzed(qwen3_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """A gateway without API keys (so every case reaches the handlers) over one short-context worker."""
    worker = WorkerProcess(Path(qwen3_path), tmp_path_factory.mktemp("fuzz-worker"), "fuzz", *FUZZ_WORKER_ARGS)
    worker.start()
    try:
        worker.wait_serving()
        gw = GatewayServer(gateway_config([worker.target], api_keys=[])).start()
        try:
            gw.wait_healthy(1)
            yield gw
        finally:
            gw.stop()
    finally:
        worker.stop()


def _violation(status: int, body: bytes) -> str | None:
    """What is wrong with an answer, if anything: a 5xx, or a 4xx without OpenAI's error body."""
    if status >= 500:
        return f"{status}: {body[:300]!r}"
    if status < 400:
        return None
    try:
        error = httpx.Response(status, content=body).json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} without an OpenAI error body: {body[:300]!r}"
    if not isinstance(error, dict) or set(error) != ERROR_FIELDS or not isinstance(error["message"], str):
        return f"{status} with a malformed error body: {body[:300]!r}"
    if not isinstance(error["type"], str) or not all(
        error[k] is None or isinstance(error[k], str) for k in ("param", "code")
    ):
        return f"{status} with a malformed error body: {body[:300]!r}"
    return None


def _naming(case: schemathesis.Case, model: str) -> schemathesis.Case:
    if isinstance(case.body, dict):
        case.body["model"] = model
    return case


def _fuzz(
    operation: schemathesis.APIOperation, mode: schemathesis.GenerationMode, examples: int, url: str, model: str
) -> list[tuple[int, str | None]]:
    """Up to `examples` cases of one operation: each answer's status and what is wrong with it, if anything.

    Valid bodies name the served model, so that they reach a worker rather than stop at 404."""
    seen: list[tuple[int, str | None]] = []
    strategy = operation.as_strategy(generation_mode=mode)
    if mode == schemathesis.GenerationMode.POSITIVE and operation.path in POST_ROUTES:
        strategy = strategy.map(lambda case: _naming(case, model))

    # No shrinking (a violation is collected, not raised) and no example database: bounded and repeatable.
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=url, timeout=60)
        problem = _violation(response.status_code, response.content)
        if problem is not None:
            problem = f"{case.method} {case.formatted_path} {case.body!r:.300}: {problem}"
        seen.append((response.status_code, problem))

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid: an operation without parameters or body has no negative cases
        assert mode == schemathesis.GenerationMode.NEGATIVE
    return seen


def test_fuzzing_the_openapi_schema_finds_no_5xx_and_only_openai_error_bodies(
    fuzzed: GatewayServer, sizes: Sizes
) -> None:
    published = httpx.get(fuzzed.url + "/openapi.json").json()
    for route in POST_ROUTES:  # the schema describes what the handlers read, or the fuzzing sends nothing useful
        assert "requestBody" in published["paths"][route]["post"], route
    schema = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")
    model = fuzzed.client().models.list().data[0].id
    operations = [result.ok() for result in schema.get_all_operations()]
    statuses: Counter = Counter()
    violations: list[str] = []
    cases = Counter()

    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            examples = sizes.fuzz_examples if operation.path in POST_ROUTES else max(sizes.fuzz_examples // 4, 3)
            for case_status, problem in _fuzz(operation, mode, examples, fuzzed.url, model):
                cases[mode.value] += 1
                statuses[case_status] += 1
                if problem is not None:
                    violations.append(problem)

    by_class = Counter(f"{status // 100}xx" for status in statuses.elements())
    print(
        f"\nschemathesis: {sum(cases.values())} cases over {len(operations)} operations "
        f"({', '.join(f'{k} {v}' for k, v in sorted(cases.items()))}): "
        + ", ".join(f"{k} {v}" for k, v in sorted(by_class.items()))
        + f"; statuses {dict(sorted(statuses.items()))}; violations {len(violations)}"
    )
    assert violations == [], "\n".join(violations[:20])
    assert by_class["2xx"] > 0 and by_class["4xx"] > 0  # both valid and invalid input got through to the handlers
