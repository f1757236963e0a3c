"""One error root with families, and the one table that says what each error code means.

Every error has a stable ``code``. :data:`ERRORS` gives each code its gRPC status,
HTTP status and CLI exit code: the broker's gRPC boundary (``broker.grpc.service``)
answers with the code's gRPC status and sends the code in the trailing metadata
key ``credbroker-error-code``; the sidecar (``sidecar.broker_client``) answers the
agent with the code's HTTP status; the CLI (``broker.cli.main``) exits with the code's
exit code. Clients map errors by that code, never by message text or status alone.
The README's error table is :func:`error_table_markdown` (a test keeps them equal).

Messages are written for the person who has to act on them, and never contain a
token, a key or any other secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


class CredbrokerError(Exception):
    """Root of every error credbroker raises on purpose.

    ``code`` is a stable, machine-readable identifier (it appears in the
    sidecar's ``{"error": {"code": ...}}`` bodies); ``str(err)`` is the message
    for a person.
    """

    code = "internal"
    #: When the caller may usefully try again (seconds), if the error knows; the broker
    #: sends it as ``credbroker-retry-after`` and the sidecar as ``Retry-After``.
    retry_after_seconds: int | None = None


# --- identity -----------------------------------------------------------------


class IdentityError(CredbrokerError):
    """The caller's identity could not be established or is not acceptable."""

    code = "unauthenticated"


class InvalidSpiffeIdError(IdentityError, ValueError):
    """A string is not a valid SPIFFE ID (SPIFFE-ID spec, section 2)."""

    code = "invalid_spiffe_id"


class WorkloadApiError(IdentityError):
    """The SPIFFE Workload API could not be reached or gave no usable SVID."""

    code = "workload_api_unavailable"


# --- policy -------------------------------------------------------------------


class PolicyError(CredbrokerError):
    """The scope map could not be loaded, or it refused a request."""

    code = "policy"


class ScopeMapError(PolicyError):
    """A scope map failed validation. ``problems`` lists every problem found."""

    code = "invalid_scope_map"

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        head = "scope map is invalid" if len(problems) != 1 else "scope map is invalid:"
        body = problems[0] if len(problems) == 1 else "\n  - " + "\n  - ".join(problems)
        super().__init__(f"{head} {body}" if len(problems) == 1 else f"{head}:{body}")


class UnknownActionClassError(PolicyError):
    """The request named an action class the scope map does not define."""

    code = "unknown_action_class"


class RequestDeniedError(PolicyError):
    """The scope map evaluated the request and denied it."""

    code = "denied"


class FrozenError(PolicyError):
    """The identity or the class was frozen (e.g. while its credential was being minted)."""

    code = "frozen"


class OutsideTeamError(PolicyError):
    """A team-scoped responder or approver acted on what another team owns (a class, an
    agent listed by another team's class, a credential of such a class)."""

    code = "outside_team"


class InvalidRequestError(CredbrokerError):
    """A request is malformed (a field missing, out of range or of the wrong type)."""

    code = "bad_request"


class UnknownEnvironmentError(InvalidRequestError):
    """A request (or a command) named an environment the broker does not declare."""

    code = "unknown_environment"


class NotFoundError(CredbrokerError):
    """The named object (credential, approval, ...) does not exist."""

    code = "not_found"


# --- vault --------------------------------------------------------------------


class VaultError(CredbrokerError):
    """Vault/OpenBao refused or failed a request the broker made."""

    code = "vault_error"


class VaultUnavailableError(VaultError):
    """Vault/OpenBao could not be reached, is sealed, or timed out."""

    code = "vault_unavailable"


class VaultPermissionError(VaultUnavailableError):
    """Vault refused the broker's own token: it is revoked, expired, or lacks a capability.

    For an agent this is an outage of the broker (503 ``vault_unavailable``), not its
    fault; the message is for the operator. Vault certainly did nothing for the request.
    """


class VaultNamespaceError(VaultPermissionError):
    """The Vault/OpenBao namespace an environment names (``namespace=``) does not exist
    there: Vault did nothing, and knows no token, role or entity of the broker's in it.

    Never read as "no such token": a misspelt namespace must not pass live credentials
    elsewhere for dead ones. For an agent an outage (503 ``vault_unavailable``).
    """


class TooManyWaitsError(CredbrokerError):
    """The caller already holds as many revocation streams or approval waits as one
    workload may: it must not take the broker's capacity from every other workload."""

    code = "too_many_waits"
    retry_after_seconds = 5


class BrokerUnavailableError(CredbrokerError):
    """The broker could not be reached (raised by clients of the broker)."""

    code = "broker_unavailable"


# --- configuration ------------------------------------------------------------


class ConfigError(CredbrokerError):
    """Configuration given at start-up is missing or invalid."""

    code = "invalid_config"


# --- audit --------------------------------------------------------------------


class AuditError(CredbrokerError):
    """The audit log cannot be written, or failed verification."""

    code = "audit_unavailable"


# --- the error contract -------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorSpec:
    """How one error code appears at each boundary; None where that boundary never gives it."""

    grpc_status: str | None  # a grpc.StatusCode name, e.g. "PERMISSION_DENIED"
    http_status: int | None  # what the sidecar answers the agent
    exit_code: int | None  # what the ``credbroker`` CLI exits with
    summary: str


def _e(grpc_status: str | None, http_status: int | None, exit_code: int | None,
       summary: str) -> ErrorSpec:
    return ErrorSpec(grpc_status=grpc_status, http_status=http_status, exit_code=exit_code,
                     summary=summary)


#: Exit codes: 1 the thing checked failed (or an error of no family); 2 usage or
#: configuration; 3 identity; 4 policy; 5 the broker, Vault or the audit log unreachable.
ERRORS: Mapping[str, ErrorSpec] = {
    # requests and usage
    "bad_request": _e("INVALID_ARGUMENT", 400, 2,
                      "a field is missing, malformed, too long or out of range"),
    "too_large": _e(None, 413, None, "the request body is larger than 64 KiB"),
    "invalid_config": _e(None, None, 2, "configuration given at start-up is missing or invalid"),
    "invalid_scope_map": _e("INVALID_ARGUMENT", 400, 2, "a scope map failed validation"),
    "not_found": _e("NOT_FOUND", 404, 1,
                    "no such credential (or not the caller's), record or endpoint"),
    "unknown_approval": _e("NOT_FOUND", 404, 1, "no such approval (or not the caller's)"),
    "unknown_environment": _e("INVALID_ARGUMENT", 400, 2,
                              "the request names an environment the broker does not declare "
                              "(the message lists the known ones)"),
    # identity
    "unauthenticated": _e("UNAUTHENTICATED", 401, 3,
                          "no acceptable SVID, or the mTLS handshake was refused"),
    "invalid_spiffe_id": _e("UNAUTHENTICATED", 401, 2, "a string is not a valid SPIFFE ID"),
    "bad_id_token": _e("UNAUTHENTICATED", 401, 3, "an approver's OIDC ID token is not valid"),
    "person_required": _e("UNAUTHENTICATED", None, 3,
                          "a responder or approver act came without a person's ID token: run "
                          "`credbroker login`"),
    "login": _e(None, None, 3, "logging in failed, or the cached login cannot be used"),
    "workload_api_unavailable": _e("UNAVAILABLE", 503, 3,
                                   "no SVID from the SPIFFE Workload API"),
    # policy: the scope map's decisions (DenyCode) first
    "unknown_action_class": _e("INVALID_ARGUMENT", 400, 2,
                               "the scope map defines no such action class"),
    "workload_not_allowed": _e("PERMISSION_DENIED", 403, 4,
                               "the class does not list the caller's SPIFFE ID"),
    "missing_required_field": _e("INVALID_ARGUMENT", 400, 4,
                                 "the class requires a field the request lacks"),
    "target_not_allowed": _e("PERMISSION_DENIED", 403, 4,
                             "the target matches none of the class's targets"),
    "ttl_above_max": _e("INVALID_ARGUMENT", 400, 4, "the TTL asked for is above max_ttl"),
    "condition_false": _e("PERMISSION_DENIED", 403, 4, "the class's `when` condition is false"),
    "budget_exhausted": _e("RESOURCE_EXHAUSTED", 429, 4,
                           "the identity has used its budget (limits); see Retry-After"),
    "federated_not_allowed": _e("PERMISSION_DENIED", 403, 4,
                                "the caller is a workload of a federated trust domain and the "
                                "class does not accept federated callers (`federated: deny`)"),
    "environment_not_allowed": _e("PERMISSION_DENIED", 403, 4,
                                  "the class is denied in the environment the request names "
                                  "(its `environments:` block)"),
    "frozen": _e("FAILED_PRECONDITION", 409, 4, "the identity or the class is frozen"),
    "denied": _e("PERMISSION_DENIED", 403, 4, "the scope map denied the request"),
    "policy": _e("PERMISSION_DENIED", 403, 4, "refused by policy"),
    "not_admin": _e("PERMISSION_DENIED", 403, 4,
                    "the caller is not an administrator (or approver client)"),
    "not_responder": _e("PERMISSION_DENIED", None, 4,
                        "the person is in none of the groups that may revoke, freeze and "
                        "unfreeze"),
    "outside_team": _e("PERMISSION_DENIED", None, 4,
                       "a team-scoped responder or approver acted on another team's class, "
                       "agents or credentials (the message says which team owns what)"),
    "approval_refused": _e("PERMISSION_DENIED", 403, 4,
                           "the approval may not be used or given (the message says why)"),
    "approval_denied": _e("PERMISSION_DENIED", 403, 4, "an approver denied the request"),
    "approval_expired": _e("PERMISSION_DENIED", 403, 4,
                           "nobody approved the request in time"),
    "break_glass_limited": _e("RESOURCE_EXHAUSTED", 429, 4,
                              "break-glass was used as often as its limit allows; see "
                              "Retry-After"),
    "too_many_waits": _e("RESOURCE_EXHAUSTED", 429, 5,
                         "the identity holds as many revocation streams or approval waits "
                         "as one workload may; see Retry-After"),
    # outages
    "busy": _e(None, 503, None, "the sidecar serves as many connections as it may"),
    "broker_unavailable": _e("UNAVAILABLE", 503, 5, "the broker cannot be reached"),
    "broker_timeout": _e("DEADLINE_EXCEEDED", 503, 5, "the broker did not answer in time"),
    "vault_unavailable": _e("UNAVAILABLE", 503, 5,
                            "Vault/OpenBao is unreachable or sealed, or refused the "
                            "broker's own token"),
    "audit_unavailable": _e("UNAVAILABLE", 503, 5,
                            "the audit log cannot be written (nothing is issued)"),
    "store_unavailable": _e("UNAVAILABLE", 503, 5, "the credential registry cannot be used"),
    "vault_error": _e("INTERNAL", 500, 1, "Vault/OpenBao refused a request the broker made"),
    "dev_stack": _e(None, None, 1, "the dev stack could not start"),
    "internal": _e("INTERNAL", 500, 1,
                   "an unexpected failure; the request id is in the log"),
}

#: The code a client assumes when an answer carries none (e.g. a proxy's), by gRPC status.
FALLBACK_CODES: Mapping[str, str] = {
    "INVALID_ARGUMENT": "bad_request",
    "UNAUTHENTICATED": "unauthenticated",
    "PERMISSION_DENIED": "denied",
    "NOT_FOUND": "not_found",
    "FAILED_PRECONDITION": "frozen",
    "RESOURCE_EXHAUSTED": "budget_exhausted",
    "UNAVAILABLE": "broker_unavailable",
    "DEADLINE_EXCEEDED": "broker_timeout",
}

#: gRPC trailing metadata keys of the contract: the code, and seconds until a retry may work.

#: ``Retry-After`` (seconds) of a 429 when the broker did not say when to retry.
DEFAULT_RETRY_AFTER_SECONDS = 30


def spec_for(code: str) -> ErrorSpec:
    """The code's entry in :data:`ERRORS`; ``internal``'s for a code not in it."""
    return ERRORS.get(code) or ERRORS["internal"]


def exit_code_for(error: CredbrokerError) -> int:
    """The CLI exit code of ``error`` (by its code; 1 when the table gives none)."""
    code = spec_for(error.code).exit_code
    return 1 if code is None else code


def error_table_markdown() -> str:
    """The README's error table (generated from :data:`ERRORS`)."""
    rows = ["| code | HTTP (sidecar) | gRPC (broker) | exit (CLI) | meaning |",
            "|---|---|---|---|---|"]
    for code, spec in ERRORS.items():
        rows.append(f"| `{code}` | {spec.http_status or '—'} | "
                    f"{f'`{spec.grpc_status}`' if spec.grpc_status else '—'} | "
                    f"{'—' if spec.exit_code is None else spec.exit_code} | {spec.summary} |")
    return "\n".join(rows) + "\n"
