"""@requires_action: a credential per call, bound to the call, handed back after it."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import hvac
import pytest
from credbroker_client import (
    ApprovalRefusedError,
    ApprovalRequired,
    AsyncClient,
    Client,
    Credential,
    arguments_digest,
    incident,
    requires_action,
    using_approval,
)

from broker.adapters.audit import read_records
from tests.integration.sdk.conftest import Stack


def decision_of(stack: Stack, request_id: str) -> dict[str, Any]:
    return next(r for r in read_records(stack.audit_path)
                if r["type"] == "decision" and r["request_id"] == request_id)


def handed_back(stack: Stack, credential_id: str) -> bool:
    return any(r["type"] == "credential.revoked" and r.get("credential_id") == credential_id
               for r in read_records(stack.audit_path))


def test_each_call_gets_its_own_bound_credential_and_hands_it_back(stack: Stack) -> None:
    client = Client(stack.socket("triage"))
    seen: list[Credential] = []

    @requires_action("enrichment", target=lambda indicator, **_: indicator,
                     justification=lambda indicator, **_: f"enrich {indicator}", client=client)
    def lookup(indicator: str, depth: int = 1, *, credential: Credential) -> str:
        seen.append(credential)
        secret = hvac.Client(url=stack.vault_addr, token=credential.token).secrets.kv.v2 \
            .read_secret_version(path="soc/enrichment/ti", raise_on_deleted_version=False)
        return f"{indicator}:{secret['data']['data']['k']}"

    with incident("splunk", "NOTABLE-100", "beaconing"):
        assert lookup("evil.example") == "evil.example:v"
        assert lookup("evil.example", depth=2) == "evil.example:v"
    assert len({c.credential_id for c in seen}) == 2  # other arguments: another credential
    first = decision_of(stack, seen[0].request_id)
    req = first["request"]
    digest = arguments_digest("lookup", {"indicator": "evil.example", "depth": 1})
    assert req["justification"] == f"enrich evil.example [tool lookup args sha256:{digest}]"
    assert req["target"] == "evil.example"
    assert req["initiating_event"]["id"] == "NOTABLE-100"
    for cred in seen:
        assert handed_back(stack, cred.credential_id)
    client.close()


def test_handed_back_when_the_tool_raises_and_async_tools_work(stack: Stack) -> None:
    client = Client(stack.socket("triage"))
    held: list[Credential] = []

    @requires_action("enrichment", client=client)
    def broken(x: int, *, credential: Credential) -> None:
        held.append(credential)
        raise RuntimeError("tool failed")

    with pytest.raises(RuntimeError, match="tool failed"):
        broken(1)
    assert handed_back(stack, held[0].credential_id)
    client.close()

    @requires_action("enrichment", target="evil.example")
    async def alookup(indicator: str, *, credential: Credential) -> str:
        await asyncio.sleep(0)
        held.append(credential)
        return credential.action_class

    async def main() -> str:
        with incident("crowdstrike", "D-7"):
            return await alookup("x")

    import os
    os.environ["CREDBROKER_SIDECAR_SOCKET"] = stack.socket("triage")
    try:
        assert asyncio.run(main()) == "enrichment"
    finally:
        del os.environ["CREDBROKER_SIDECAR_SOCKET"]
    assert decision_of(stack, held[1].request_id)["request"]["initiating_event"]["source"] == \
        "crowdstrike"
    assert handed_back(stack, held[1].credential_id)


def test_pending_approval_raises_then_the_same_call_retries_with_it(stack: Stack) -> None:
    client = Client(stack.socket("containment"))
    ran: list[str] = []

    @requires_action("containment.isolate_host", target=lambda host, **_: host,
                     justification="C2 confirmed", client=client)
    def isolate(host: str, *, credential: Credential) -> str:
        ran.append(host)
        return f"isolated {host}"

    with incident("splunk", "NOTABLE-200"):
        with pytest.raises(ApprovalRequired) as pending:
            isolate("ws-200")
        assert not ran and pending.value.approval_id.startswith("apr-")
        with using_approval(pending.value.approval_id):
            with pytest.raises(ApprovalRequired):  # still pending: told again, same id
                isolate("ws-200")
            stack.approve(pending.value.approval_id)
            with pytest.raises(ApprovalRefusedError, match="another call"):
                isolate("ws-201")  # the approval was for ws-200
            assert isolate("ws-200") == "isolated ws-200"
    assert ran == ["ws-200"]
    client.close()


def test_wait_mode_waits_for_the_approver(stack: Stack) -> None:
    async def main() -> str:
        client = AsyncClient(stack.socket("containment"))

        @requires_action("containment.isolate_host", target=lambda host, **_: host,
                         justification="C2 confirmed", on_approval="wait",
                         approval_timeout=30, client=client)
        async def isolate(host: str, *, credential: Credential) -> str:
            return f"isolated {host} with {credential.action_class}"

        def approver() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                pending = [a for a in stack.pending() if a.request.target == "ws-300"]
                if pending:
                    stack.approve(pending[0].id)
                    return
                time.sleep(0.1)

        threading.Thread(target=approver, daemon=True).start()
        with incident("splunk", "NOTABLE-300"):
            out = await isolate("ws-300")
        await client.aclose()
        return out

    assert asyncio.run(main()) == "isolated ws-300 with containment.isolate_host"


def test_async_tool_with_the_default_client_retries_with_its_approval(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDBROKER_SIDECAR_SOCKET", stack.socket("containment"))

    @requires_action("containment.isolate_host", target=lambda host, **_: host,
                     justification="C2 confirmed")
    async def isolate(host: str, *, credential: Credential) -> str:
        return f"isolated {host}"

    async def main() -> str:
        with incident("splunk", "NOTABLE-400"):
            try:
                await isolate("ws-400")
            except ApprovalRequired as pending:
                approval_id = pending.approval_id
            with using_approval(approval_id):
                with pytest.raises(ApprovalRequired):  # pending: told again, not refused
                    await isolate("ws-400")
                await asyncio.to_thread(stack.approve, approval_id)
                return await isolate("ws-400")

    assert asyncio.run(main()) == "isolated ws-400"
