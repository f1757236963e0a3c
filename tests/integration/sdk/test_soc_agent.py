"""examples/soc_agent.py against the real stack: enrich (MCP), isolate (approved by a dev IdP
user through the approvals API), close the ticket; `credbroker audit trace` shows each call."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading

import pytest
from credbroker_client import AsyncClient, PendingApproval, arguments_digest

from broker.cli.main import main as credbroker
from tests.integration.sdk.conftest import ROOT, Stack


def _example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("soc_agent", ROOT / "examples" /
                                                  "soc_agent.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["soc_agent"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_the_soc_agent_handles_an_alert_one_credential_per_step(
        stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    ex = _example()
    approved: list[str] = []

    def approver(pending: PendingApproval) -> None:  # a person, through the approvals API
        def run() -> None:
            stack.approve(pending.approval_id)
            approved.append(pending.approval_id)
        threading.Thread(target=run, daemon=True).start()

    alert = ex.Alert(source="splunk", id="NOTABLE-800", summary="beaconing to evil.example",
                     host="ws-800", indicator="evil.example", ticket="TICKET-800")

    async def main():  # type: ignore[no-untyped-def]
        intel = ex.threat_intel_server(stack.vault_addr, socket_path=stack.socket("triage"))
        async with AsyncClient(stack.socket("containment")) as client:
            agent = ex.SocAgent(client, intel, stack.vault_addr, approval_timeout=30,
                                on_pending=approver)
            return await agent.handle(alert)

    report = asyncio.run(main())
    assert [s.name for s in report.steps] == ["enrich", "isolate", "close"]
    assert [s.action_class for s in report.steps] == ["enrichment", "containment.isolate_host",
                                                      "ticketing.close"]
    assert len({s.credential_id for s in report.steps}) == 3 and len(approved) == 1
    assert "approved by alice@example.org" in report.steps[1].detail
    digests = {"enrich": arguments_digest("lookup_indicator", {"indicator": "evil.example"}),
               "isolate": arguments_digest("isolate_host", {"host": "ws-800"}),
               "close": arguments_digest("close_ticket", {"ticket": "TICKET-800",
                                                    "resolution": "true positive; ws-800 "
                                                                  "isolated"})}
    capsys.readouterr()
    for step in report.steps:
        assert credbroker(["audit", "trace", step.credential_id, "--log",
                           str(stack.audit_path)]) == 0
        trace = capsys.readouterr().out
        assert "initiating event: splunk NOTABLE-800 — beaconing to evil.example" in trace
        assert f"action class: {step.action_class}" in trace
        assert f"args sha256:{digests[step.name]}" in trace
        assert f"credential {step.credential_id} minted" in trace
        assert "handed back by the workload" in trace
        assert ("approved by: alice@example.org" in trace) == (step.name == "isolate")
        assert ("/agent/triage" in trace) == (step.name == "enrich")  # the MCP server's own

