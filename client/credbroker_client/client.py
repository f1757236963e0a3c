"""Sync :class:`Client` and async :class:`AsyncClient` of the sidecar's HTTP/JSON API on its
unix socket (``$CREDBROKER_SIDECAR_SOCKET``)."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import httpx

from credbroker_client import _core
from credbroker_client._core import EventLike, RetryPolicy
from credbroker_client.errors import (
    ApprovalRequired,
    ApprovalTimeout,
    CredbrokerError,
    SidecarUnreachableError,
)
from credbroker_client.models import Credential, HandBack, PendingApproval

Answer = tuple[int, Any, httpx.Headers]


def _unreachable(path: str, exc: Exception) -> SidecarUnreachableError:
    return SidecarUnreachableError(
        f"no answer from the sidecar at {path} ({type(exc).__name__}); is it running, and "
        f"does {_core.SOCKET_ENV} name its socket?")


class _Base:
    def __init__(self, socket_path: str | None, timeout: float,
                 retry: RetryPolicy | None) -> None:
        self.socket_path = socket_path if socket_path is not None else _core.socket_from_env()
        self.socket_path = self.socket_path.removeprefix("unix:")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.approvals = _core.ApprovalBook()

    def _timeout(self, wait: int) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, read=self.timeout + wait)

    def _issued(self, body: dict[str, Any], answer: Answer) -> Credential | PendingApproval:
        result = _core.credential_or_pending(*answer)
        if isinstance(result, PendingApproval):
            self.approvals.note(result.approval_id, _core.request_fingerprint(body))
        return result

    @staticmethod
    def _waits(timeout: float) -> Iterator[int]:
        """Whole seconds to ask the sidecar to wait, call by call, until ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            yield max(1, min(_core.MAX_WAIT_SECONDS, math.ceil(left)))


class Client(_Base):
    """The sidecar's API, synchronously. ``socket_path``: ``$CREDBROKER_SIDECAR_SOCKET`` when
    not given. ``timeout``: seconds for each call (long polls add their wait). Use it as a
    context manager, or call :meth:`close`.
    """

    def __init__(self, socket_path: str | None = None, *, timeout: float = 30.0,
                 retry: RetryPolicy | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(socket_path, timeout, retry)
        self._http = httpx.Client(transport=transport or httpx.HTTPTransport(uds=self.socket_path),
                                  base_url=_core.BASE_URL, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None,
              wait: int = 0) -> Answer:
        for attempt in range(self.retry.attempts):
            try:
                resp = self._http.request(method, path, json=body, timeout=self._timeout(wait))
            except httpx.ConnectError as exc:
                delay = self.retry.delay(attempt, None)
                if delay is None:
                    raise _unreachable(self.socket_path, exc) from None
                time.sleep(delay)
                continue
            except httpx.TransportError as exc:
                raise _unreachable(self.socket_path, exc) from None
            payload = _core.parse_json(resp.status_code, resp.content)
            if resp.status_code == 503:
                delay = self.retry.delay(attempt, _core.retry_after_header(resp.headers))
                if delay is not None:
                    time.sleep(delay)
                    continue
            return resp.status_code, payload, resp.headers
        raise AssertionError("unreachable")  # pragma: no cover

    # -- credentials

    def request(self, action_class: str, *, target: str | None = None,
                initiating_event: EventLike = None, justification: str | None = None,
                ttl_seconds: int | None = None, approval_id: str | None = None,
                break_glass: bool = False,
                wait_seconds: int | None = None,
                environment: str | None = None) -> Credential | PendingApproval:
        """``POST /v1/credentials``: a credential, or the pending approval it needs.

        Raises: the error code's :class:`CredbrokerError` subclass (e.g.
        ``WorkloadNotAllowedError``), :class:`SidecarUnreachableError`.
        """
        body = _core.issue_body(action_class, target=target, initiating_event=initiating_event,
                                justification=justification, ttl_seconds=ttl_seconds,
                                approval_id=approval_id, break_glass=break_glass,
                                wait_seconds=wait_seconds, environment=environment)
        return self._issued(body, self._send("POST", "/v1/credentials", body,
                                             wait_seconds or 0))

    def credential(self, action_class: str, *, approval_timeout: float | None = None,
                   **fields: Any) -> Credential:
        """Like :meth:`request`, but always a credential: a pending approval is waited for up
        to ``approval_timeout`` seconds, or (None) raised as :class:`ApprovalRequired`."""
        result = self.request(action_class, **fields)
        if isinstance(result, Credential):
            return result
        if approval_timeout is None:
            raise ApprovalRequired(result)
        return self.wait_for_approval(result.approval_id, approval_timeout)

    @contextmanager
    def lease(self, action_class: str, *, approval_timeout: float | None = None,
              **fields: Any) -> Iterator[Credential]:
        """``with client.lease("enrichment", ...) as cred:`` — handed back on exit."""
        cred = self.credential(action_class, approval_timeout=approval_timeout, **fields)
        try:
            yield cred
        finally:
            self.hand_back_quietly(cred)

    def poll_approval(self, approval_id: str) -> Credential | PendingApproval:
        """``GET /v1/approvals/{id}``: the credential once approved (minted then, once), else
        the pending approval. Raises: ``ApprovalDeniedError``, ``ApprovalExpiredError``, ..."""
        return _core.credential_or_pending(*self._send("GET", f"/v1/approvals/{approval_id}"))

    def wait_for_approval(self, approval_id: str, timeout: float) -> Credential:
        """Long-poll until the approval is decided: the credential when approved.

        Raises: :class:`ApprovalTimeout` after ``timeout`` seconds (the approval stays
        pending), ``ApprovalDeniedError``, ``ApprovalExpiredError``, ...
        """
        for wait in self._waits(timeout):
            result = _core.credential_or_pending(
                *self._send("GET", f"/v1/approvals/{approval_id}?wait={wait}", wait=wait))
            if isinstance(result, Credential):
                self.approvals.forget(approval_id)
                return result
        raise ApprovalTimeout(approval_id, timeout)

    def hand_back(self, credential_id: str) -> HandBack:
        """``DELETE /v1/credentials/{id}``: revoke it now. Raises: ``NotFoundError``, ..."""
        return _core.hand_back_result(*self._send("DELETE", f"/v1/credentials/{credential_id}"))

    def hand_back_quietly(self, cred: Credential) -> HandBack | None:
        """Hand back, never raising (what a ``finally`` needs); None when it failed (the
        credential still expires at ``expires_at``)."""
        try:
            return self.hand_back(cred.credential_id)
        except CredbrokerError:
            return None

    def freeze_self(self, reason: str) -> dict[str, Any]:
        """``POST /v1/freeze``: this agent declares itself compromised or runaway. Its
        identity is frozen at once (every credential refused by Vault, none issued); only a
        person can lift it, never the agent. Returns the freeze (``freeze_id``,
        ``spiffe_id``, ``frozen_at``, ``vault_enforced``, ...).

        Raises: the error code's :class:`CredbrokerError` subclass.
        """
        return _core.ok_json(*self._send("POST", "/v1/freeze", {"reason": reason}))

    def health(self) -> dict[str, Any]:
        return _core.ok_json(*self._send("GET", "/healthz"))

    def openapi(self) -> dict[str, Any]:
        """The sidecar's OpenAPI 3.1 document (``GET /openapi.json``)."""
        return _core.ok_json(*self._send("GET", "/openapi.json"))


class AsyncClient(_Base):
    """The same API for asyncio/anyio code. Every call is cancellable: cancelling the task
    that awaits :meth:`wait_for_approval` stops the long poll at once."""

    def __init__(self, socket_path: str | None = None, *, timeout: float = 30.0,
                 retry: RetryPolicy | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(socket_path, timeout, retry)
        self._http = httpx.AsyncClient(
            transport=transport or httpx.AsyncHTTPTransport(uds=self.socket_path),
            base_url=_core.BASE_URL, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, body: dict[str, Any] | None = None,
                    wait: int = 0) -> Answer:
        for attempt in range(self.retry.attempts):
            try:
                resp = await self._http.request(method, path, json=body,
                                                timeout=self._timeout(wait))
            except httpx.ConnectError as exc:
                delay = self.retry.delay(attempt, None)
                if delay is None:
                    raise _unreachable(self.socket_path, exc) from None
                await anyio.sleep(delay)
                continue
            except httpx.TransportError as exc:
                raise _unreachable(self.socket_path, exc) from None
            payload = _core.parse_json(resp.status_code, resp.content)
            if resp.status_code == 503:
                delay = self.retry.delay(attempt, _core.retry_after_header(resp.headers))
                if delay is not None:
                    await anyio.sleep(delay)
                    continue
            return resp.status_code, payload, resp.headers
        raise AssertionError("unreachable")  # pragma: no cover

    async def request(self, action_class: str, *, target: str | None = None,
                      initiating_event: EventLike = None, justification: str | None = None,
                      ttl_seconds: int | None = None, approval_id: str | None = None,
                      break_glass: bool = False,
                      wait_seconds: int | None = None,
                      environment: str | None = None) -> Credential | PendingApproval:
        """See :meth:`Client.request`."""
        body = _core.issue_body(action_class, target=target, initiating_event=initiating_event,
                                justification=justification, ttl_seconds=ttl_seconds,
                                approval_id=approval_id, break_glass=break_glass,
                                wait_seconds=wait_seconds, environment=environment)
        return self._issued(body, await self._send("POST", "/v1/credentials", body,
                                                   wait_seconds or 0))

    async def credential(self, action_class: str, *, approval_timeout: float | None = None,
                         **fields: Any) -> Credential:
        """See :meth:`Client.credential`."""
        result = await self.request(action_class, **fields)
        if isinstance(result, Credential):
            return result
        if approval_timeout is None:
            raise ApprovalRequired(result)
        return await self.wait_for_approval(result.approval_id, approval_timeout)

    @asynccontextmanager
    async def lease(self, action_class: str, *, approval_timeout: float | None = None,
                    **fields: Any) -> AsyncIterator[Credential]:
        """``async with client.lease("enrichment", ...) as cred:`` — handed back on exit."""
        cred = await self.credential(action_class, approval_timeout=approval_timeout, **fields)
        try:
            yield cred
        finally:
            with anyio.CancelScope(shield=True):  # handed back even when cancelled
                await self.hand_back_quietly(cred)

    async def poll_approval(self, approval_id: str) -> Credential | PendingApproval:
        """See :meth:`Client.poll_approval`."""
        return _core.credential_or_pending(
            *await self._send("GET", f"/v1/approvals/{approval_id}"))

    async def wait_for_approval(self, approval_id: str, timeout: float) -> Credential:
        """See :meth:`Client.wait_for_approval`; cancel the awaiting task to stop waiting."""
        for wait in self._waits(timeout):
            result = _core.credential_or_pending(
                *await self._send("GET", f"/v1/approvals/{approval_id}?wait={wait}", wait=wait))
            if isinstance(result, Credential):
                self.approvals.forget(approval_id)
                return result
        raise ApprovalTimeout(approval_id, timeout)

    async def hand_back(self, credential_id: str) -> HandBack:
        """See :meth:`Client.hand_back`."""
        return _core.hand_back_result(
            *await self._send("DELETE", f"/v1/credentials/{credential_id}"))

    async def hand_back_quietly(self, cred: Credential) -> HandBack | None:
        """See :meth:`Client.hand_back_quietly`."""
        try:
            return await self.hand_back(cred.credential_id)
        except CredbrokerError:
            return None

    async def freeze_self(self, reason: str) -> dict[str, Any]:
        """See :meth:`Client.freeze_self`."""
        return _core.ok_json(*await self._send("POST", "/v1/freeze", {"reason": reason}))

    async def health(self) -> dict[str, Any]:
        return _core.ok_json(*await self._send("GET", "/healthz"))

    async def openapi(self) -> dict[str, Any]:
        return _core.ok_json(*await self._send("GET", "/openapi.json"))
