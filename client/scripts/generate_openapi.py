"""Regenerate sidecar/openapi.json, the OpenAPI 3.1 document of the sidecar's HTTP API.

    python client/scripts/generate_openapi.py          # rewrite it
    python client/scripts/generate_openapi.py --check  # exit 1 if it is out of date

The error codes come from ``broker.errors.ERRORS`` (every code the sidecar answers with,
under its HTTP status); the rest is written here. The sidecar serves the committed file at
``GET /openapi.json``; tests/sdk/test_openapi.py checks real answers against it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "sidecar" / "openapi.json"

STRING = {"type": "string"}
STRINGS = {"type": "array", "items": STRING}
ID = {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"}
TIME = {"type": "string", "format": "date-time"}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: dict[str, Any], optional: dict[str, Any] | None = None,
        description: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": {**required, **(optional or {})},
                           "required": list(required), "additionalProperties": False}
    if description:
        out["description"] = description
    return out


def sidecar_codes() -> dict[int, list[str]]:
    sys.path.insert(0, str(ROOT))
    from broker.errors import ERRORS

    by_status: dict[int, list[str]] = {}
    for code, spec in ERRORS.items():
        if spec.http_status is not None:
            by_status.setdefault(spec.http_status, []).append(code)
    return dict(sorted(by_status.items()))


def summaries() -> dict[str, str]:
    from broker.errors import ERRORS

    return {code: spec.summary for code, spec in ERRORS.items()}


def document() -> dict[str, Any]:
    codes = sidecar_codes()
    summary = summaries()
    all_codes = [c for cs in codes.values() for c in cs]
    schemas: dict[str, Any] = {
        "InitiatingEvent": obj({"source": {"type": "string", "maxLength": 128},
                                "id": {"type": "string", "maxLength": 256}},
                               {"summary": {"type": "string", "maxLength": 1024}},
                               "what made the agent act (an alert, a ticket)"),
        "IssueRequest": obj(
            {"action_class": {"type": "string", "minLength": 1, "maxLength": 128,
                              "examples": ["enrichment"]}},
            {"target": {"type": "string", "maxLength": 256},
             "initiating_event": ref("InitiatingEvent"),
             "justification": {"type": "string", "maxLength": 2048,
                               "description": "why; credbroker-client's per-tool-call "
                               "credentials end it with `[tool NAME args sha256:HEX]`, a "
                               "SHA-256 of the tool's name and arguments"},
             "ttl_seconds": {"type": "integer", "minimum": 1},
             "environment": {"type": "string", "maxLength": 64,
                             "description": "the environment (its own Vault/OpenBao) the "
                             "credential is for, e.g. sandbox; left out: the broker's default "
                             "one; unknown: 400 unknown_environment"},
             "break_glass": {"type": "boolean"},
             "approval_id": ID,
             "wait_seconds": {"type": "integer", "minimum": 0, "maximum": 60}},
            "a credential for one action class"),
        "Owner": obj({"team": STRING, "contact": STRING}),
        "Decision": obj({"outcome": {"enum": ["allow", "deny", "needs_approval"]},
                         "action_class": STRING, "rule": STRING, "reasons": STRINGS,
                         "owner": ref("Owner"), "escalation": STRINGS,
                         "scope_map_version": STRING, "source": STRING, "risk": STRING,
                         "spiffe_id": STRING}, description="the scope map's decision"),
        "ApprovalInfo": obj({"approval_id": ID, "status": STRING, "action_class": STRING,
                             "approvers": STRINGS,
                             "approvals_required": {"type": "integer", "minimum": 0},
                             "approved_by": STRINGS, "expires_at": TIME}),
        "Credential": obj(
            {"credential_id": STRING,
             "token": {"type": "string", "description": "the Vault/OpenBao token: a secret"},
             "expires_at": TIME, "ttl_seconds": {"type": "integer", "minimum": 0},
             "action_class": STRING, "policies": STRINGS, "request_id": STRING,
             "decision": ref("Decision"), "cached": {"type": "boolean"}},
            {"minted_request_id": {"type": "string", "description": "a cached answer: the "
                                   "request that minted the credential"},
             "approval": ref("ApprovalInfo"),
             "environment": {"type": "string", "description": "the environment whose Vault "
                             "minted the token (only when the broker declares environments); "
                             "it means nothing in any other"}},
            "a minutes-long token for exactly one action class"),
        "PendingApproval": obj(
            {"approval_id": ID, "status": STRING, "action_class": STRING,
             "approvers": STRINGS, "approvals_required": {"type": "integer", "minimum": 0},
             "approved_by": STRINGS, "expires_at": TIME,
             "poll": {"type": "string", "examples": ["/v1/approvals/apr-0123?wait=30"]},
             "request_id": STRING},
            {"decision": ref("Decision")},
            "the class needs a person's approval: poll `poll` (GET /v1/approvals/{id})"),
        "HandBack": obj({"credential_id": STRING, "revoked": {"type": "boolean"},
                         "already_dead": {"type": "boolean"}}),
        "FreezeRequest": obj({"reason": {"type": "string", "minLength": 1, "maxLength": 1000,
                                         "examples": ["prompt injection suspected"]}},
                             description="why the agent stops itself (audited)"),
        "Frozen": obj({"frozen": {"const": True}, "freeze_id": STRING,
                       "spiffe_id": STRING, "by": {"type": "string",
                                                   "examples": ["self:spiffe://..."]},
                       "reason": STRING, "frozen_at": TIME,
                       "credentials_matched": {"type": "integer", "minimum": 0},
                       "vault_enforced": {"type": "boolean", "description": "false: in "
                                          "force for issuance; Vault enforcement is retried"}},
                      description="this workload's identity is frozen; only a person can "
                      "lift it"),
        "Health": obj({"status": {"const": "ok"}, "spiffe_id": STRING,
                       "cached_credentials": {"type": "integer", "minimum": 0},
                       "unreported_cache_hits": {"type": "integer", "minimum": 0}}),
        "ErrorCode": {"enum": all_codes, "description": "stable; map errors by it:\n" +
                      "\n".join(f"- `{c}` ({s}): {summary[c]}"
                                for s, cs in codes.items() for c in cs)},
        "Error": obj({"error": obj(
            {"code": ref("ErrorCode"), "message": STRING},
            {"decision": ref("Decision"),
             "retry_after_seconds": {"type": "integer", "minimum": 0}})}),
    }
    responses: dict[str, Any] = {}
    for status, cs in codes.items():
        body = {"allOf": [ref("Error"), {"properties": {"error": {"properties": {
            "code": {"enum": cs}}}}}]}
        resp: dict[str, Any] = {
            "description": "; ".join(f"`{c}`: {summary[c]}" for c in cs),
            "content": {"application/json": {"schema": body}},
            "x-error-codes": cs}
        if status in (429, 503):
            resp["headers"] = {"Retry-After": {
                "description": "seconds until a retry may succeed"
                + (" (always on 429)" if status == 429 else " (on `busy`)"),
                "required": status == 429, "schema": {"type": "integer", "minimum": 0}}}
        responses[f"Error{status}"] = resp

    def errors(*statuses: int) -> dict[str, Any]:
        return {str(s): {"$ref": f"#/components/responses/Error{s}"} for s in statuses}

    every = tuple(codes)

    def ok(schema: str, description: str) -> dict[str, Any]:
        return {"description": description,
                "content": {"application/json": {"schema": ref(schema)}}}

    paths = {
        "/v1/credentials": {"post": {
            "operationId": "issueCredential",
            "summary": "ask for a credential for one action class",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": ref("IssueRequest")}}},
            "responses": {"200": ok("Credential", "issued (or answered from the cache)"),
                          "202": ok("PendingApproval", "the class needs approval"),
                          **errors(*every)}}},
        "/v1/credentials/{credential_id}": {"delete": {
            "operationId": "handBack", "summary": "hand a credential back (revoke it now)",
            "parameters": [{"name": "credential_id", "in": "path", "required": True,
                            "schema": ID}],
            "responses": {"200": ok("HandBack", "revoked, or already dead"),
                          **errors(*every)}}},
        "/v1/freeze": {"post": {
            "operationId": "freezeSelf",
            "summary": "freeze this workload's own identity at once (compromised or "
                       "runaway): every credential of it refused by Vault, none issued; "
                       "the workload cannot undo it (a person unfreezes)",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": ref("FreezeRequest")}}},
            "responses": {"200": ok("Frozen", "frozen (or frozen by itself already)"),
                          **errors(*every)}}},
        "/v1/approvals/{approval_id}": {"get": {
            "operationId": "awaitApproval",
            "summary": "wait for an approval: the credential once approved (minted then, "
                       "once, for exactly the approved request)",
            "parameters": [{"name": "approval_id", "in": "path", "required": True,
                            "schema": ID},
                           {"name": "wait", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 0, "maximum": 60,
                                       "default": 0},
                            "description": "seconds to wait for a decision"}],
            "responses": {"200": ok("Credential", "approved: the credential"),
                          "202": ok("PendingApproval", "still pending"),
                          **errors(*every)}}},
        "/healthz": {"get": {
            "operationId": "health", "summary": "the sidecar's identity and state",
            "responses": {"200": ok("Health", "serving"), **errors(404, 500, 503)}}},
        "/openapi.json": {"get": {
            "operationId": "openapi", "summary": "this document",
            "responses": {"200": {"description": "the OpenAPI 3.1 document",
                                  "content": {"application/json": {
                                      "schema": {"type": "object"}}}}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "credbroker sidecar API", "version": "1",
                 "description": "The agent-facing API of the credbroker sidecar: HTTP/1.1 "
                 "and JSON on a unix socket (the agent container's "
                 "$CREDBROKER_SIDECAR_SOCKET); any Host header. Every error body is "
                 "{\"error\": {\"code\", \"message\"}} with the code's status; codes are "
                 "stable. Bodies are at most 64 KiB, sent with Content-Length."},
        "servers": [{"url": "http://sidecar", "description": "the unix socket "
                     "(e.g. curl --unix-socket $CREDBROKER_SIDECAR_SOCKET http://sidecar/...)"}],
        "paths": paths,
        "components": {"schemas": schemas, "responses": responses},
    }


def text() -> str:
    return json.dumps(document(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text():
            print(f"{OUT} is out of date; run client/scripts/generate_openapi.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
