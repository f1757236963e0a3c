"""credbroker_client.Client / AsyncClient against a real broker, sidecar and OpenBao."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import hvac
import pytest
from credbroker_client import (
    ApprovalDeniedError,
    ApprovalRequired,
    ApprovalTimeout,
    AsyncClient,
    BudgetExhaustedError,
    BusyError,
    Client,
    Credential,
    FrozenError,
    InitiatingEvent,
    PendingApproval,
    RetryPolicy,
    SidecarUnreachableError,
    UnknownActionClassError,
    WorkloadNotAllowedError,
)

from sidecar.app import SidecarHttpServer
from tests.integration.sdk.conftest import Stack

EVENT = InitiatingEvent("splunk", "NOTABLE-9", "beaconing")
ISOLATE: dict[str, Any] = {"target": "ws-9", "initiating_event": EVENT,
                           "justification": "isolate ws-9"}


def vault_rejects(stack: Stack, token: str) -> bool:
    try:
        hvac.Client(url=stack.vault_addr, token=token).auth.token.lookup_self()
    except hvac.exceptions.Forbidden:
        return True
    return False


def approve_soon(stack: Stack, approval_id: str, delay: float = 0.3) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        stack.approve(approval_id)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_credential_is_typed_usable_and_handed_back_by_the_context_manager(
        stack: Stack) -> None:
    with Client(stack.socket("triage")) as c:
        with c.lease("enrichment", target="evil.example", initiating_event=EVENT,
                     justification="client test") as cred:
            assert isinstance(cred, Credential) and cred.action_class == "enrichment"
            assert cred.decision is not None and cred.decision.outcome == "allow"
            assert cred.token not in repr(cred) and cred.token not in str(cred)
            assert 0 < cred.seconds_left() <= 300
            hvac.Client(url=stack.vault_addr, token=cred.token).secrets.kv.v2 \
                .read_secret_version(path="soc/enrichment/ti", raise_on_deleted_version=False)
        assert vault_rejects(stack, cred.token)
        assert c.health()["spiffe_id"].endswith("/agent/triage")


def test_errors_are_one_class_per_code(stack: Stack) -> None:
    with Client(stack.socket("triage")) as c:
        with pytest.raises(WorkloadNotAllowedError) as err:
            c.request("containment.isolate_host", **ISOLATE)
        assert err.value.status == 403 and err.value.code == "workload_not_allowed"
        assert err.value.decision and err.value.decision["outcome"] == "deny"
        with pytest.raises(UnknownActionClassError):
            c.request("no.such.class")


def test_socket_from_the_environment(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDBROKER_SIDECAR_SOCKET", "unix:" + stack.socket("triage"))
    with Client() as c:
        assert c.health()["status"] == "ok"
    monkeypatch.delenv("CREDBROKER_SIDECAR_SOCKET")
    with pytest.raises(ValueError, match="CREDBROKER_SIDECAR_SOCKET"):
        Client()


def test_pending_approval_then_wait_for_approval(stack: Stack) -> None:
    with Client(stack.socket("containment")) as c:
        pending = c.request("containment.isolate_host", **ISOLATE)
        assert isinstance(pending, PendingApproval) and pending.approvers == ("ir-leads",)
        assert pending.poll.startswith("/v1/approvals/")
        with pytest.raises(ApprovalRequired) as req:
            c.credential("containment.isolate_host", **ISOLATE)
        approve_soon(stack, pending.approval_id)
        cred = c.wait_for_approval(pending.approval_id, timeout=20)
        assert cred.approved_by == ("alice@example.org",) and cred.approval_id == \
            pending.approval_id
        c.hand_back(cred.credential_id)
        started = time.monotonic()
        with pytest.raises(ApprovalTimeout) as timeout:
            c.wait_for_approval(req.value.approval_id, timeout=1.5)
        assert 1.0 <= time.monotonic() - started < 6
        assert timeout.value.approval_id == req.value.approval_id


def test_async_wait_is_cancellable_and_a_denial_is_typed(stack: Stack) -> None:
    async def main() -> None:
        async with AsyncClient(stack.socket("containment")) as c:
            pending = await c.request("containment.isolate_host", **ISOLATE)
            assert isinstance(pending, PendingApproval)
            task = asyncio.create_task(c.wait_for_approval(pending.approval_id, timeout=60))
            await asyncio.sleep(0.5)
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - started < 1.0
            stack.deny(pending.approval_id, "bob@example.org")
            with pytest.raises(ApprovalDeniedError, match=r"bob@example\.org"):
                await c.wait_for_approval(pending.approval_id, timeout=10)

    asyncio.run(main())


class Counting(httpx.BaseTransport):
    """Sends the first ``busy_first`` requests to a sidecar that is always busy."""

    def __init__(self, busy: str, real: str, busy_first: int) -> None:
        self.busy = httpx.HTTPTransport(uds=busy)
        self.real = httpx.HTTPTransport(uds=real)
        self.left = busy_first
        self.count = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.count += 1
        if self.left > 0:
            self.left -= 1
            return self.busy.handle_request(request)
        return self.real.handle_request(request)

    def close(self) -> None:
        self.busy.close()
        self.real.close()


def test_busy_is_retried_with_backoff_honouring_retry_after(stack: Stack,
                                                             tmp_path: Path) -> None:
    sc = stack.sidecars["triage"]
    busy = SidecarHttpServer(Path(stack.socket("triage") + ".busy"), sc.service,
                             max_connections=0)
    busy.serve_in_thread()
    try:
        t = Counting(str(busy.path), stack.socket("triage"), busy_first=1)
        with Client(stack.socket("triage"), transport=t,
                    retry=RetryPolicy(attempts=3, base_delay=0.01)) as c:
            started = time.monotonic()
            assert c.health()["status"] == "ok"
            assert t.count == 2 and time.monotonic() - started >= 1.0  # Retry-After: 1
        t = Counting(str(busy.path), stack.socket("triage"), busy_first=99)
        with Client(stack.socket("triage"), transport=t,
                    retry=RetryPolicy(attempts=2, base_delay=0.01)) as c:
            with pytest.raises(BusyError) as err:
                c.health()
            assert t.count == 2 and err.value.status == 503 and err.value.retry_after == 1
    finally:
        busy.close()


def test_no_sidecar_budget_and_freeze(stack: Stack, tmp_path: Path) -> None:
    with Client(str(tmp_path / "none.sock"),
                retry=RetryPolicy(attempts=2, base_delay=0.01)) as c:
        with pytest.raises(SidecarUnreachableError, match="CREDBROKER_SIDECAR_SOCKET"):
            c.health()
    with Client(stack.socket("containment")) as c:
        c.hand_back(c.credential("sdk.budget", justification="first").credential_id)
        started = time.monotonic()
        with pytest.raises(BudgetExhaustedError) as err:
            c.request("sdk.budget", justification="second")
        assert err.value.retry_after and err.value.retry_after > 60
        assert time.monotonic() - started < 2  # a long Retry-After is not slept through
        # sdk.frozen is frozen when the stack starts
        with pytest.raises(FrozenError) as frozen:
            c.request("sdk.frozen")
        assert frozen.value.status == 409
