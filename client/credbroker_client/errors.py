"""The client's exceptions: one root, one class per error code (``credbroker_client._codes``,
generated from ``errors.json``), and the few the client raises itself.

Map errors by class (or ``code``), never by message text. No exception carries a token.
"""

from __future__ import annotations

from typing import Any


class CredbrokerError(Exception):
    """The sidecar answered with an error (or could not be reached).

    ``code`` is the stable error code (the README's error table); ``status`` the HTTP status
    (0 when there was no answer); ``message`` what to do, for a person; ``body`` the whole
    JSON error body; ``retry_after`` seconds until a retry may succeed, when known.
    """

    code: str = "internal"
    http_status: int | None = None

    def __init__(self, message: str, *, status: int = 0, code: str | None = None,
                 body: dict[str, Any] | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.status = status
        self.message = message
        self.body = body or {}
        self.retry_after = retry_after

    @property
    def decision(self) -> dict[str, Any] | None:
        """The scope map's decision, when the sidecar sent one (denials do)."""
        err = self.body.get("error") or {}
        dec = err.get("decision")
        return dec if isinstance(dec, dict) else None

    def __str__(self) -> str:
        where = f"{self.status} " if self.status else ""
        return f"{where}{self.code}: {self.message}"


class SidecarUnreachableError(CredbrokerError):
    """No answer from the sidecar: its socket is missing, refuses connections, or timed out."""

    code = "sidecar_unreachable"


class ProtocolError(CredbrokerError):
    """The sidecar answered something this client does not understand."""

    code = "protocol"


class ApprovalRequired(CredbrokerError):
    """The action class needs a person's approval; nothing was issued yet.

    ``approval_id`` names the pending approval: wait for it (``Client.wait_for_approval``)
    or call again with it later. ``pending`` is the full :class:`PendingApproval`.
    """

    code = "approval_required"
    http_status = 202

    def __init__(self, pending: Any) -> None:
        self.pending = pending
        self.approval_id: str = pending.approval_id
        who = ", ".join(pending.approvers) or "an approver"
        super().__init__(
            f"{pending.action_class} needs approval {pending.approval_id} from {who} "
            f"(expires {pending.expires_at.isoformat()}); wait for it or retry with the "
            "approval id", status=202)


class ApprovalTimeout(CredbrokerError, TimeoutError):
    """Waiting for an approval ran out of time; the approval is still pending."""

    code = "approval_timeout"

    def __init__(self, approval_id: str, waited: float) -> None:
        self.approval_id = approval_id
        super().__init__(f"approval {approval_id} still pending after {waited:.0f} s; it is "
                         "not withdrawn: wait again or retry with the approval id later")
