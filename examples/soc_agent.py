"""A rule-based SOC agent (no model) built on credbroker-client: every step of handling an
alert is its own tool call with its own, separately scoped and audited credential.

    alert ──▶ enrich (MCP tool on the threat-intel server, which has its own identity and
              sidecar: class ``enrichment``)
          ──▶ isolate the host if the verdict is malicious (``containment.isolate_host``:
              a person approves first; the agent waits)
          ──▶ close the ticket (``ticketing.close``)

Each request names the alert as its initiating event (``incident(...)``) and ends its
justification with a SHA-256 of the tool's arguments; each credential is handed back when
its step ends. ``credbroker audit trace <credential id>`` shows each step.

Run it against a dev stack started with this example's scope map:

    credbroker dev --scope-map examples/soc-agent-scope-map.yaml --run-dir /tmp/cb &
    python examples/soc_agent.py --dev /tmp/cb --approve-as alice@example.org

``--approve-as`` lets a dev IdP user approve the isolation (through the approvals API, as
``credbroker approvals approve ID --dev DIR --as USER`` does); without it the agent prints
the command for a person to run and waits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from credbroker_client import AsyncClient, Credential, PendingApproval, incident, requires_action
from credbroker_client.mcp import INCIDENT_META_KEY, CredentialedTools
from mcp import Client as McpClient
from mcp.server.mcpserver import MCPServer

#: What the demo's "APIs" read from Vault with each step's credential.
SECRETS = {"enrichment": "soc/enrichment/ti", "containment.isolate_host": "soc/containment/edr",
           "ticketing.close": "soc/tickets/api"}


@dataclass(frozen=True)
class Alert:
    source: str
    id: str
    summary: str
    host: str
    indicator: str
    ticket: str


@dataclass
class Step:
    name: str
    action_class: str
    credential_id: str
    detail: str


@dataclass
class Report:
    alert: Alert
    steps: list[Step] = field(default_factory=list)


async def read_secret(vault_addr: str, token: str, path: str) -> dict[str, Any]:
    """The KV v2 secret at ``path``, read with the step's own token (it can read nothing
    else)."""
    async with httpx.AsyncClient(base_url=vault_addr, timeout=10) as vault:
        resp = await vault.get(f"/v1/secret/data/{path}", headers={"X-Vault-Token": token})
        resp.raise_for_status()
        return dict(resp.json()["data"]["data"])


def threat_intel_server(vault_addr: str, *, socket_path: str | None = None,
                        client_factory: Callable[[], AsyncClient] | None = None) -> MCPServer:
    """The enrichment MCP server: it runs as its own workload with its own sidecar."""
    server = MCPServer("threat-intel")
    tools = CredentialedTools(server, socket_path=socket_path, client_factory=client_factory)

    @tools.tool("enrichment", target=lambda indicator, **_: indicator,
                justification="enrich the alert's indicator")
    async def lookup_indicator(indicator: str, *, credential: Credential) -> dict[str, Any]:
        """Threat intelligence on one indicator (domain, IP or hash)."""
        await read_secret(vault_addr, credential.token, SECRETS["enrichment"])  # the feed key
        malicious = indicator.endswith((".example", ".bad")) or indicator.startswith("203.0.113.")
        return {"indicator": indicator, "verdict": "malicious" if malicious else "benign",
                "credential_id": credential.credential_id}

    return server


class SocAgent:
    """Handles one alert at a time, by rules."""

    def __init__(self, client: AsyncClient, intel: MCPServer, vault_addr: str, *,
                 approval_timeout: float = 120.0,
                 on_pending: Callable[[PendingApproval], Any] | None = None) -> None:
        self.client = client
        self.intel = intel
        self.vault_addr = vault_addr
        self.isolate_host = requires_action(
            "containment.isolate_host", target=lambda host, **_: host,
            justification=lambda host, **_: f"isolate {host}: the alert's indicator is "
            "malicious", on_approval="wait", approval_timeout=approval_timeout,
            on_pending=on_pending or self._tell_a_person, client=client,
            name="isolate_host")(self._isolate)
        self.close_ticket = requires_action(
            "ticketing.close", target=lambda ticket, **_: ticket,
            justification="close the handled alert's ticket", client=client,
            name="close_ticket")(self._close)

    @staticmethod
    def _tell_a_person(pending: PendingApproval) -> None:
        print(f"  waiting for approval {pending.approval_id} by {', '.join(pending.approvers)}:"
              f" credbroker approvals approve {pending.approval_id} --reason '...'", flush=True)

    async def _isolate(self, host: str, *, credential: Credential) -> Step:
        await read_secret(self.vault_addr, credential.token, SECRETS["containment.isolate_host"])
        return Step("isolate", credential.action_class, credential.credential_id,
                    f"{host} network-isolated (approved by {', '.join(credential.approved_by)})")

    async def _close(self, ticket: str, resolution: str, *, credential: Credential) -> Step:
        await read_secret(self.vault_addr, credential.token, SECRETS["ticketing.close"])
        return Step("close", credential.action_class, credential.credential_id,
                    f"{ticket} closed: {resolution}")

    async def handle(self, alert: Alert) -> Report:
        report = Report(alert)
        event = {"source": alert.source, "id": alert.id, "summary": alert.summary}
        with incident(alert.source, alert.id, alert.summary):
            async with McpClient(self.intel) as intel:
                result = await intel.call_tool("lookup_indicator",
                                               {"indicator": alert.indicator},
                                               meta={INCIDENT_META_KEY: event})
            if result.is_error:
                raise RuntimeError(f"enrichment failed: {result.content[0].text}")
            found = result.structured_content or {}
            report.steps.append(Step("enrich", "enrichment", found["credential_id"],
                                     f"{alert.indicator} is {found['verdict']}"))
            if found["verdict"] == "malicious":
                report.steps.append(await self.isolate_host(alert.host))
                resolution = f"true positive; {alert.host} isolated"
            else:
                resolution = "benign indicator; no action"
            report.steps.append(await self.close_ticket(alert.ticket, resolution))
        return report


def _dev_approver(run_dir: str, user: str) -> Callable[[PendingApproval], None]:
    """Approves as a dev IdP user with the CLI (the approvals API, --as USER), in a thread."""
    def approve(pending: PendingApproval) -> None:
        print(f"  approval {pending.approval_id} pending; {user} approves it", flush=True)
        threading.Thread(target=subprocess.run, daemon=True, args=([
            sys.executable, "-m", "broker.cli.main", "approvals", "approve", pending.approval_id,
            "--dev", run_dir, "--as", user, "--reason", "confirmed C2; isolate"],),
            kwargs={"check": False}).start()
    return approve


async def _main(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per step is enough
    dev = json.loads((Path(args.dev) / "dev.json").read_text())
    vault = dev["vault_addr"]
    # Demo data only: the dev stack's root token writes the secrets each step reads.
    async with httpx.AsyncClient(base_url=vault, headers={"X-Vault-Token": dev["vault_token"]},
                                 timeout=10) as root:
        for path in SECRETS.values():
            (await root.post(f"/v1/secret/data/{path}", json={"data": {"api_key": "demo"}})
             ).raise_for_status()
    intel = threat_intel_server(vault, socket_path=dev["sidecars"]["triage"]["socket"])
    alert = Alert(source="splunk", id=args.alert_id, summary="beaconing to evil.example",
                  host=args.host, indicator="evil.example", ticket=f"TICKET-{args.alert_id}")
    async with AsyncClient(dev["sidecars"]["containment"]["socket"]) as client:
        agent = SocAgent(client, intel, vault, on_pending=_dev_approver(args.dev, args.approve_as)
                         if args.approve_as else None)
        report = await agent.handle(alert)
    print(f"alert {alert.source} {alert.id}: {alert.summary}")
    for step in report.steps:
        print(f"  {step.name:<8} {step.action_class:<26} credential {step.credential_id}: "
              f"{step.detail}")
    print(f"each step: credbroker audit trace <credential id> --dev {args.dev}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dev", required=True, metavar="DIR", help="the dev stack's run dir")
    p.add_argument("--approve-as", metavar="USER", help="a dev IdP user approves the "
                   "isolation (e.g. alice@example.org)")
    p.add_argument("--alert-id", default="NOTABLE-4242")
    p.add_argument("--host", default="ws-042")
    return asyncio.run(_main(p.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
