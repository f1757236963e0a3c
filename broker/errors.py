"""One error root with families, translated once at each boundary.

The broker's gRPC servicer maps these to status codes (``broker.service``), the
sidecar maps status codes to HTTP statuses (``sidecar.app``), and the CLI maps
them to exit codes (``broker.cli``). Messages are written for the person who
has to act on them, and never contain a token, a key or any other secret.
"""

from __future__ import annotations


class CredbrokerError(Exception):
    """Root of every error credbroker raises on purpose.

    ``code`` is a stable, machine-readable identifier (it appears in the
    sidecar's ``{"error": {"code": ...}}`` bodies); ``str(err)`` is the message
    for a person.
    """

    code = "internal"


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


class InvalidRequestError(CredbrokerError):
    """A request is malformed (a field missing, out of range or of the wrong type)."""

    code = "bad_request"


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
