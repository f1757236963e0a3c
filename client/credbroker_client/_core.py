"""What the sync and async clients share: request bodies, reading answers, backoff."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from credbroker_client._codes import ERROR_CLASSES
from credbroker_client.errors import CredbrokerError, ProtocolError
from credbroker_client.models import Credential, HandBack, InitiatingEvent, PendingApproval

#: The one environment variable naming the sidecar's unix socket (in the agent's container).
SOCKET_ENV = "CREDBROKER_SIDECAR_SOCKET"
#: The sidecar answers a long poll for at most this many seconds per request.
MAX_WAIT_SECONDS = 60
BASE_URL = "http://sidecar"


def socket_from_env(env: Mapping[str, str] | None = None) -> str:
    """The socket path ``$CREDBROKER_SIDECAR_SOCKET`` names (a ``unix:`` prefix is dropped).

    Raises: ValueError when it is not set.
    """
    path = (os.environ if env is None else env).get(SOCKET_ENV, "")
    if not path:
        raise ValueError(f"{SOCKET_ENV} is not set: set it to the sidecar's socket, e.g. "
                         "/run/credbroker/sidecar.sock")
    return path.removeprefix("unix:")


EventLike = InitiatingEvent | Mapping[str, str] | None


def issue_body(action_class: str, *, target: str | None = None,
               initiating_event: EventLike = None, justification: str | None = None,
               ttl_seconds: int | None = None, approval_id: str | None = None,
               break_glass: bool = False, wait_seconds: int | None = None,
               environment: str | None = None) -> dict[str, Any]:
    """The JSON body of ``POST /v1/credentials`` (fields left out when not given)."""
    body: dict[str, Any] = {"action_class": action_class}
    if isinstance(initiating_event, InitiatingEvent):
        event: dict[str, str] | None = initiating_event.to_json()
    else:
        event = dict(initiating_event) if initiating_event else None
    for key, value in (("target", target), ("initiating_event", event),
                       ("justification", justification), ("ttl_seconds", ttl_seconds),
                       ("approval_id", approval_id), ("wait_seconds", wait_seconds),
                       ("environment", environment)):
        if value is not None:
            body[key] = value
    if break_glass:
        body["break_glass"] = True
    return body


def request_fingerprint(body: Mapping[str, Any]) -> str:
    """SHA-256 of the request as the broker binds an approval to it (no approval id or wait)."""
    bound = {k: v for k, v in body.items() if k not in ("approval_id", "wait_seconds")}
    return hashlib.sha256(json.dumps(bound, sort_keys=True).encode()).hexdigest()


def retry_after_header(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("retry-after")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def error_from(status: int, payload: Any, headers: Mapping[str, str]) -> CredbrokerError:
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        return ProtocolError(f"the sidecar answered {status} without an error body",
                             status=status, body=payload if isinstance(payload, dict) else None)
    code = str(err.get("code") or "internal")
    retry = retry_after_header(headers)
    if retry is None and isinstance(err.get("retry_after_seconds"), int | float):
        retry = float(err["retry_after_seconds"])
    cls = ERROR_CLASSES.get(code, CredbrokerError)
    return cls(str(err.get("message") or ""), status=status, code=code, body=payload,
               retry_after=retry)


def parse_json(status: int, content: bytes) -> Any:
    try:
        return json.loads(content or b"{}")
    except ValueError:
        raise ProtocolError(f"the sidecar answered {status} with a body that is not JSON",
                            status=status) from None


def credential_or_pending(status: int, payload: Any,
                          headers: Mapping[str, str]) -> Credential | PendingApproval:
    """Raises: the error code's exception for any error status."""
    if status == 200:
        try:
            return Credential.from_json(payload)
        except (KeyError, TypeError, ValueError):
            raise ProtocolError("the sidecar's 200 answer holds no credential",
                                status=status) from None
    if status == 202:
        return PendingApproval.from_json(payload)
    raise error_from(status, payload, headers)


def hand_back_result(status: int, payload: Any, headers: Mapping[str, str]) -> HandBack:
    if status != 200:
        raise error_from(status, payload, headers)
    return HandBack(credential_id=str(payload.get("credential_id", "")),
                    revoked=bool(payload.get("revoked")),
                    already_dead=bool(payload.get("already_dead")))


def ok_json(status: int, payload: Any, headers: Mapping[str, str]) -> dict[str, Any]:
    if status != 200 or not isinstance(payload, dict):
        raise error_from(status, payload, headers)
    return payload


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Retries of ``503`` answers (``busy``, broker/Vault briefly unreachable) and of a sidecar
    that is not accepting connections: jittered exponential backoff, never sooner than the
    answer's ``Retry-After``. ``attempts`` counts the first try; 1 turns retries off.
    """

    attempts: int = 4
    base_delay: float = 0.2
    max_delay: float = 5.0
    #: A Retry-After longer than this is not waited for: the error is raised instead.
    max_retry_after: float = 10.0

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to sleep before try ``attempt + 1`` (0-based ``attempt`` just failed),
        or None when no retry is left."""
        if attempt + 1 >= self.attempts:
            return None
        if retry_after is not None and retry_after > self.max_retry_after:
            return None
        backoff = min(self.max_delay, self.base_delay * 2 ** attempt)
        jittered = backoff * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrecy
        return float(max(jittered, retry_after or 0.0))


class ApprovalBook:
    """Which request each approval this client opened was for (bounded, newest kept), so a
    retry with an approval id is only honoured for the same request."""

    def __init__(self, size: int = 1024) -> None:
        self._items: OrderedDict[str, str] = OrderedDict()
        self._size = size

    def note(self, approval_id: str, fingerprint: str) -> None:
        self._items[approval_id] = fingerprint
        self._items.move_to_end(approval_id)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def matches(self, approval_id: str, fingerprint: str) -> bool:
        return self._items.get(approval_id) == fingerprint

    def knows(self, approval_id: str) -> bool:
        return approval_id in self._items

    def forget(self, approval_id: str) -> None:
        self._items.pop(approval_id, None)
