"""The client's error table and classes, and the sidecar's OpenAPI document, agree with
the broker's one error table; plus the client's pure parts (backoff, argument digests)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import credbroker_client
import pytest
from credbroker_client import ERROR_CLASSES, CredbrokerError, RetryPolicy, arguments_digest
from credbroker_client.tools import JUSTIFICATION_MAX, bound_justification
from openapi_spec_validator import validate

from broker.errors import ERRORS

ROOT = Path(__file__).parents[3]
PKG = ROOT / "client" / "credbroker_client"


def _script(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, ROOT / "client" / "scripts" /
                                                  f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_committed_error_table_is_the_brokers() -> None:
    committed = json.loads((PKG / "errors.json").read_text())
    assert committed == {code: {"http_status": s.http_status, "grpc_status": s.grpc_status,
                                "exit_code": s.exit_code, "summary": s.summary}
                         for code, s in ERRORS.items()}
    assert list(committed) == list(ERRORS)


def test_one_exception_class_per_code_generated_from_the_json() -> None:
    gen = _script("generate_errors")
    committed = json.loads((PKG / "errors.json").read_text())
    assert (PKG / "_codes.py").read_text() == gen.codes_module(committed)
    assert set(ERROR_CLASSES) == set(ERRORS)
    for code, cls in ERROR_CLASSES.items():
        assert issubclass(cls, CredbrokerError) and cls.code == code
        assert cls.http_status == ERRORS[code].http_status
        assert getattr(credbroker_client, cls.__name__) is cls
    assert len({cls.__name__ for cls in ERROR_CLASSES.values()}) == len(ERRORS)


def test_the_openapi_document_is_current_valid_and_lists_every_code() -> None:
    gen = _script("generate_openapi")
    doc_text = (ROOT / "sidecar" / "openapi.json").read_text()
    assert doc_text == gen.text(), "run client/scripts/generate_openapi.py"
    doc = json.loads(doc_text)
    validate(doc)  # OpenAPI 3.1
    assert doc["openapi"].startswith("3.1")
    sidecar_codes = {c for c, s in ERRORS.items() if s.http_status is not None}
    assert set(doc["components"]["schemas"]["ErrorCode"]["enum"]) == sidecar_codes
    for code in sidecar_codes:
        status = ERRORS[code].http_status
        assert code in doc["components"]["responses"][f"Error{status}"]["x-error-codes"]
    for path in ("/v1/credentials", "/v1/credentials/{credential_id}",
                 "/v1/approvals/{approval_id}", "/healthz", "/openapi.json"):
        assert path in doc["paths"]


def test_backoff_is_jittered_exponential_and_honours_retry_after() -> None:
    p = RetryPolicy(attempts=4, base_delay=0.2, max_delay=1.0, max_retry_after=10)
    for attempt, ceiling in ((0, 0.2), (1, 0.4), (2, 0.8)):
        delays = [p.delay(attempt, None) for _ in range(50)]
        assert all(d is not None and ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered
    assert p.delay(3, None) is None  # no attempt left
    assert p.delay(0, 3.0) == pytest.approx(3.0)  # never sooner than Retry-After
    assert p.delay(0, 30.0) is None  # too long to wait: raised instead


def test_argument_digest_is_canonical_and_the_justification_fits() -> None:
    assert arguments_digest("t", {"a": 1, "b": [1, 2]}) == \
        arguments_digest("t", {"b": [1, 2], "a": 1})
    assert arguments_digest("t", {"a": 1}) != arguments_digest("u", {"a": 1})
    assert arguments_digest("t", {"a": 1}) != arguments_digest("t", {"a": 2})
    digest = arguments_digest("t", {"a": 1})
    long = bound_justification("x" * 5000, "t", digest)
    assert len(long) <= JUSTIFICATION_MAX and long.endswith(f"[tool t args sha256:{digest}]")
    assert bound_justification(None, "t", digest) == f"[tool t args sha256:{digest}]"


def test_the_client_package_imports_nothing_of_the_broker() -> None:
    for path in PKG.glob("*.py"):
        text = path.read_text()
        for banned in ("import broker", "from broker", "import sidecar", "from sidecar",
                       "grpc", "hvac"):
            assert banned not in text, f"{path.name} mentions {banned!r}"
