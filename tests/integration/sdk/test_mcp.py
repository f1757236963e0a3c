"""credbroker_client.mcp: an MCPServer whose tools get a credential per tools/call, driven by
the SDK's in-memory client (mcp.Client(server)) against a real broker, sidecar and OpenBao."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import httpx
import hvac
from credbroker_client import AsyncClient, Credential, arguments_digest
from credbroker_client.mcp import INCIDENT_META_KEY, CredentialedTools
from mcp import Client as McpClient
from mcp.server.mcpserver import MCPServer

from broker.adapters.audit import read_records
from tests.integration.sdk.conftest import Stack

CLIENT_SECRET = "Bearer mcp-client-secret-0123456789"
META = {INCIDENT_META_KEY: {"source": "splunk", "id": "NOTABLE-500", "summary": "beacon"},
        "authorization": CLIENT_SECRET}


class Spy(httpx.AsyncBaseTransport):
    """Records every request the integration sends its sidecar."""

    def __init__(self, socket: str, seen: list[httpx.Request]) -> None:
        self.inner = httpx.AsyncHTTPTransport(uds=socket)
        self.seen = seen

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def build(stack: Stack, sidecar: str, seen: list[httpx.Request]) -> MCPServer:
    server = MCPServer("soc-tools")
    tools = CredentialedTools(server, client_factory=lambda: AsyncClient(
        stack.socket(sidecar), transport=Spy(stack.socket(sidecar), seen)))

    @tools.tool("enrichment", target=lambda indicator, **_: indicator,
                justification="enrich the alert")
    async def lookup_indicator(indicator: str, *, credential: Credential) -> dict[str, Any]:
        """Threat intel on one indicator."""
        secret = hvac.Client(url=stack.vault_addr, token=credential.token).secrets.kv.v2 \
            .read_secret_version(path="soc/enrichment/ti", raise_on_deleted_version=False)
        return {"indicator": indicator, "verdict": "malicious",
                "feed_key_present": bool(secret["data"]["data"]),
                "credential_id": credential.credential_id}

    @tools.tool("containment.isolate_host", target=lambda host, **_: host,
                justification="isolate a compromised host")
    def isolate_host(host: str, *, credential: Credential) -> str:
        """Network-isolate one host."""
        return f"isolated {host} ({credential.action_class})"

    return server


def test_each_call_gets_a_bound_credential_and_no_client_token_is_forwarded(
        stack: Stack) -> None:
    seen: list[httpx.Request] = []

    async def main() -> Any:
        async with McpClient(build(stack, "triage", seen)) as mcp:
            listed = {t.name: t for t in (await mcp.list_tools()).tools}
            props = listed["lookup_indicator"].input_schema["properties"]
            assert set(props) == {"indicator", "approval_id"}
            assert listed["lookup_indicator"].input_schema["required"] == ["indicator"]
            return await mcp.call_tool("lookup_indicator", {"indicator": "evil.example"},
                                       meta=META)

    result = anyio.run(main)
    assert not result.is_error, result
    out = result.structured_content
    assert out["verdict"] == "malicious" and out["feed_key_present"]
    records = list(read_records(stack.audit_path))
    minted = next(r for r in records if r["type"] == "credential.minted"
                  and r["credential_id"] == out["credential_id"])
    decision = next(r for r in records if r["type"] == "decision"
                    and r["request_id"] == minted["request_id"])
    digest = arguments_digest("lookup_indicator", {"indicator": "evil.example"})
    assert decision["request"]["justification"] == \
        f"enrich the alert [tool lookup_indicator args sha256:{digest}]"
    assert decision["request"]["initiating_event"]["id"] == "NOTABLE-500"
    assert any(r["type"] == "credential.revoked" and r["credential_id"] == out["credential_id"]
               for r in records)  # handed back after the call
    # Only POST and DELETE to the sidecar; nothing of the MCP request's credentials in them.
    assert [r.method for r in seen] == ["POST", "DELETE"]
    for r in seen:
        assert "authorization" not in {k.lower() for k in r.headers}
        assert b"mcp-client-secret" not in r.content
    assert "mcp-client-secret" not in stack.audit_path.read_text()


def test_a_call_needing_approval_answers_at_once_with_the_approval_id(stack: Stack) -> None:
    seen: list[httpx.Request] = []

    async def main() -> None:
        async with McpClient(build(stack, "containment", seen)) as mcp:
            started = time.monotonic()
            first = await mcp.call_tool("isolate_host", {"host": "ws-500"}, meta=META)
            assert time.monotonic() - started < 5  # never a hang
            assert first.is_error
            info = first.structured_content["credbroker"]
            assert info["status"] == "approval_required"
            approval_id = info["approval_id"]
            assert approval_id in first.content[0].text and "approval_id" in \
                first.content[0].text
            again = await mcp.call_tool("isolate_host", {"host": "ws-500",
                                                         "approval_id": approval_id}, meta=META)
            assert again.structured_content["credbroker"]["approval_id"] == approval_id
            await anyio.to_thread.run_sync(stack.approve, approval_id)
            other = await mcp.call_tool("isolate_host", {"host": "ws-501",
                                                         "approval_id": approval_id}, meta=META)
            assert other.is_error and other.structured_content["credbroker"]["code"] == \
                "approval_refused"
            done = await mcp.call_tool("isolate_host", {"host": "ws-500",
                                                        "approval_id": approval_id}, meta=META)
            assert not done.is_error, done
            assert done.structured_content["result"] == \
                "isolated ws-500 (containment.isolate_host)"

    anyio.run(main)


def test_a_refusal_is_a_tool_error_naming_the_code(stack: Stack) -> None:
    async def main() -> Any:
        async with McpClient(build(stack, "triage", [])) as mcp:  # triage may not isolate
            return await mcp.call_tool("isolate_host", {"host": "ws-502"}, meta=META)

    result = anyio.run(main)
    assert result.is_error
    info = result.structured_content["credbroker"]
    assert info["code"] == "workload_not_allowed", info
    assert "workload_not_allowed" in result.content[0].text
    assert "token" not in json.dumps(result.structured_content)
