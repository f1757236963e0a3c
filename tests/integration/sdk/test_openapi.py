"""Every answer of the real sidecar to a set of representative requests (200, 202, 400, 403,
404, 409, 413, 429, 503) is what sidecar/openapi.json says it may be."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from broker.errors import ERRORS
from sidecar.app import SidecarHttpServer
from tests.integration.sdk.conftest import Stack

DOC_PATH = Path(__file__).parents[3] / "sidecar" / "openapi.json"
DOC: dict[str, Any] = json.loads(DOC_PATH.read_text())
EVENT = {"source": "splunk", "id": "NOTABLE-700"}


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def operation(method: str, path: str) -> tuple[str, dict[str, Any]]:
    for template, ops in DOC["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in ops:
            return template, ops[method.lower()]
    raise AssertionError(f"{method} {path} is not in the OpenAPI document")


class Checker:
    def __init__(self) -> None:
        self.statuses: set[int] = set()
        self.codes: set[str] = set()

    def check(self, method: str, path: str, resp: httpx.Response) -> Any:
        template, op = operation(method, path.partition("?")[0])
        status = str(resp.status_code)
        assert status in op["responses"], f"{method} {template} may not answer {status}"
        where = ["paths", template, method.lower(), "responses", status]
        spec = op["responses"][status]
        if "$ref" in spec:
            where = spec["$ref"].removeprefix("#/").split("/")
            spec = DOC["components"]["responses"][where[-1]]
        assert resp.headers["content-type"] == "application/json"
        root = {**DOC, "$ref": _pointer(*where, "content", "application/json", "schema")}
        body = resp.json()
        errors = sorted(Draft202012Validator(
            root, format_checker=Draft202012Validator.FORMAT_CHECKER).iter_errors(body),
            key=str)
        assert not errors, f"{method} {path} {status}: {errors[0].message}"
        for name, header in (spec.get("headers") or {}).items():
            if header.get("required"):
                assert name in resp.headers, f"{status} without {name}"
        self.statuses.add(resp.status_code)
        if resp.status_code >= 400:
            self.codes.add(body["error"]["code"])
        return body


@pytest.fixture
def http(stack: Stack) -> Any:
    clients = {n: httpx.Client(transport=httpx.HTTPTransport(uds=stack.socket(n)),
                               base_url="http://sidecar") for n in ("triage", "containment")}
    yield clients
    for c in clients.values():
        c.close()


def test_representative_answers_match_the_document(stack: Stack, http: Any) -> None:
    c = Checker()
    tri, con = http["triage"], http["containment"]

    def post(client: httpx.Client, body: Any) -> Any:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return c.check("POST", "/v1/credentials", client.post(
            "/v1/credentials", content=raw, headers={"Content-Type": "application/json"}))

    def get(client: httpx.Client, path: str) -> Any:
        return c.check("GET", path, client.get(path))

    # 200s
    assert get(tri, "/healthz")["status"] == "ok"
    served = tri.get("/openapi.json")
    assert served.status_code == 200 and served.json() == DOC
    c.check("GET", "/openapi.json", served)
    ask = {"action_class": "enrichment", "target": "evil.example", "initiating_event": EVENT,
           "justification": "openapi"}
    cred = post(tri, ask)
    assert post(tri, ask)["cached"] is True  # a cached answer has minted_request_id too
    assert c.check("DELETE", "/v1/credentials/x", tri.delete(
        f"/v1/credentials/{cred['credential_id']}"))["revoked"] is True
    # 202, then 200 with the approval
    isolate = {"action_class": "containment.isolate_host", "target": "ws-700",
               "initiating_event": EVENT, "justification": "openapi"}
    pending = post(con, isolate)
    assert get(con, f"/v1/approvals/{pending['approval_id']}?wait=0")["status"] == "pending"
    stack.approve(pending["approval_id"])
    approved = get(con, f"/v1/approvals/{pending['approval_id']}?wait=5")
    assert approved["approval"]["approved_by"] == ["alice@example.org"]
    # 403: the scope map denies; an approver denied
    post(tri, isolate)
    denied = post(con, {**isolate, "target": "ws-701"})
    stack.deny(denied["approval_id"], "bob@example.org")
    get(con, f"/v1/approvals/{denied['approval_id']}")
    # 400s
    post(tri, b"{not json")
    post(tri, {"action_class": "no.such.class"})
    post(con, {"action_class": "containment.isolate_host", "target": "ws-1",
               "justification": "no event"})  # missing_required_field
    get(con, f"/v1/approvals/{pending['approval_id']}?wait=abc")
    # 404s
    get(tri, "/v1/approvals/apr-doesnotexist")
    c.check("DELETE", "/v1/credentials/x", tri.delete("/v1/credentials/no-such-credential"))
    # 409, 413, 429
    post(con, {"action_class": "sdk.frozen"})
    post(tri, b'{"action_class": "' + b"x" * 70_000 + b'"}')
    for n in range(3):
        if con.post("/v1/credentials", json={"action_class": "sdk.budget",
                                             "justification": f"spend {n}"}).status_code == 429:
            break
    post(con, {"action_class": "sdk.budget", "justification": "over budget"})
    # 503: every connection slot taken
    busy = SidecarHttpServer(Path(stack.socket("triage") + ".busy503"),
                             stack.sidecars["triage"].service, max_connections=0)
    busy.serve_in_thread()
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(busy.path)),
                          base_url="http://sidecar") as b:
            post(b, ask)
    finally:
        busy.close()

    assert c.statuses >= {200, 202, 400, 403, 404, 409, 413, 429, 503}, c.statuses
    assert c.codes >= {"bad_request", "unknown_action_class", "missing_required_field",
                       "workload_not_allowed", "approval_denied", "not_found",
                       "unknown_approval", "frozen", "too_large", "budget_exhausted", "busy"}
    assert c.codes <= {code for code, s in ERRORS.items() if s.http_status}


def test_the_checker_rejects_what_the_document_does_not_allow() -> None:
    c = Checker()
    ok = {"status": "ok", "spiffe_id": "spiffe://x/y", "cached_credentials": 0,
          "unreported_cache_hits": 0}
    c.check("GET", "/healthz", httpx.Response(200, json=ok))
    with pytest.raises(AssertionError, match="Additional properties"):
        c.check("GET", "/healthz", httpx.Response(200, json={**ok, "token": "s"}))
    with pytest.raises(AssertionError, match="is not one of"):  # a 404 code under 400
        c.check("POST", "/v1/credentials", httpx.Response(
            400, json={"error": {"code": "not_found", "message": "m"}}))
    with pytest.raises(AssertionError, match="without Retry-After"):
        c.check("POST", "/v1/credentials", httpx.Response(
            429, json={"error": {"code": "budget_exhausted", "message": "m",
                                 "retry_after_seconds": 3}}))
