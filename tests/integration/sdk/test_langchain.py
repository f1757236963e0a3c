"""credbroker_client.langchain: a LangChain tool with an action class, invoked directly (no
LLM) against a real broker, sidecar and OpenBao."""

from __future__ import annotations

import asyncio
import re

from credbroker_client import AsyncClient, Client, Credential, arguments_digest, incident
from credbroker_client.langchain import credentialed_tool

from broker.adapters.audit import read_records
from tests.integration.sdk.conftest import Stack


def isolate_host(host: str, reason: str = "C2", *, credential: Credential) -> str:
    """Network-isolate one host through the EDR."""
    return f"isolated {host} ({credential.action_class}, {credential.credential_id})"


def test_the_tool_schema_the_approval_message_and_the_retry(stack: Stack) -> None:
    client = Client(stack.socket("containment"))
    tool = credentialed_tool(isolate_host, "containment.isolate_host",
                             target=lambda host, **_: host,
                             justification=lambda host, reason, **_: f"{reason} on {host}",
                             client=client)
    assert tool.name == "isolate_host" and "EDR" in tool.description
    assert set(tool.args) == {"host", "reason", "approval_id"}
    assert tool.metadata == {"credbroker_action_class": "containment.isolate_host"}
    with incident("splunk", "NOTABLE-600"):
        told = tool.invoke({"host": "ws-600"})
        assert isinstance(told, str) and told.startswith("Not done yet")
        approval_id = re.search(r"approval_id (\S+?),", told).group(1)  # type: ignore[union-attr]
        stack.approve(approval_id)
        done = tool.invoke({"host": "ws-600", "approval_id": approval_id})
    assert done.startswith("isolated ws-600 (containment.isolate_host, ")
    cred_id = done.rsplit(", ", 1)[1].rstrip(")")
    records = list(read_records(stack.audit_path))
    minted = next(r for r in records if r["type"] == "credential.minted"
                  and r["credential_id"] == cred_id)
    decision = [r for r in records if r["type"] == "decision"
                and r["request_id"] == minted["request_id"]][-1]  # the one that released it
    digest = arguments_digest("isolate_host", {"host": "ws-600", "reason": "C2"})
    assert decision["request"]["justification"] == \
        f"C2 on ws-600 [tool isolate_host args sha256:{digest}]"
    assert decision["request"]["initiating_event"]["id"] == "NOTABLE-600"
    assert decision["approvers"] == ["alice@example.org"]
    assert any(r["type"] == "credential.revoked" and r["credential_id"] == cred_id
               for r in records)
    client.close()


def test_refusals_reach_the_agent_as_text_and_async_tools_work(stack: Stack) -> None:
    refused = credentialed_tool(isolate_host, "containment.isolate_host",
                                client=Client(stack.socket("triage")))
    text = refused.invoke({"host": "ws-601"})
    assert "workload_not_allowed" in text and "was not run" in text

    async def lookup(indicator: str, *, credential: Credential) -> str:
        """Threat intel on one indicator."""
        return f"{indicator}: {credential.action_class}"

    tool = credentialed_tool(lookup, "enrichment",
                             async_client_factory=lambda: AsyncClient(stack.socket("triage")))
    assert asyncio.run(tool.ainvoke({"indicator": "evil.example"})) == \
        "evil.example: enrichment"
