"""A real stack for the SDK tests: OpenBao dev, the dev Workload API, a broker with the SOC
agent example's scope map (plus two test classes) and the dev IdP's keys as approvers, and
two sidecars: ``triage`` (the enrichment MCP server's) and ``containment`` (the SOC agent's).

The client package is imported from ``client/`` (as the installed distribution would be).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import hvac
import pytest

ROOT = Path(__file__).parents[3]
sys.path.insert(0, str(ROOT / "client"))

from broker._proto.credbroker.v1 import broker_pb2 as pb  # noqa: E402
from broker.adapters.approvers import ApproverConfig, DevIssuer  # noqa: E402
from broker.grpc.server import BrokerServer  # noqa: E402
from credbroker_dev.devstack import OpenBaoDev  # noqa: E402
from tests.integration.conftest import (  # noqa: E402
    ADMIN,
    Identity,
    Sidecar,
    broker_config,
    start_sidecar,
)
from tests.integration.helpers import admin_stub, approvals_stub, svid  # noqa: E402

EXAMPLE_MAP = ROOT / "examples" / "soc-agent-scope-map.yaml"
EXTRA = Path(__file__).parent / "data" / "extra-classes.yaml"
APPROVER = "alice@example.org"


@dataclass
class Stack:
    broker: BrokerServer
    identity: Identity
    idp: DevIssuer
    sidecars: dict[str, Sidecar]
    vault_addr: str

    def socket(self, name: str) -> str:
        return str(self.sidecars[name].http.path)

    @property
    def audit_path(self) -> Path:
        return Path(self.broker.config.audit_path)

    def pending(self) -> list[pb.ApprovalInfo]:
        return list(self._approvals().ListApprovals(pb.ListApprovalsRequest(),
                                                    timeout=10).approvals)

    def approve(self, approval_id: str, user: str = APPROVER) -> pb.ApprovalInfo:
        return self._approvals().Approve(pb.ApprovalDecisionRequest(  # type: ignore[no-any-return]
            approval_id=approval_id, reason=f"{user}: go ahead",
            id_token=self.idp.id_token(user)), timeout=10)

    def deny(self, approval_id: str, user: str) -> pb.ApprovalInfo:
        return self._approvals().Deny(pb.ApprovalDecisionRequest(  # type: ignore[no-any-return]
            approval_id=approval_id, reason=f"{user}: no", id_token=self.idp.id_token(user)),
            timeout=10)

    def _approvals(self):  # type: ignore[no-untyped-def]
        return approvals_stub(self.broker.port, self.identity.ca,
                              svid(self.identity.ca, ADMIN, ttl=timedelta(hours=1)))


@pytest.fixture(scope="session")
def stack(bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client,
          short_tmp: Path) -> Iterator[Stack]:
    vault_root.secrets.kv.v2.create_or_update_secret(path="soc/tickets/api", secret={"k": "v"})
    d = Path(tempfile.mkdtemp(prefix="sdk-", dir=short_tmp))
    maps = d / "maps"
    maps.mkdir()
    shutil.copy(EXAMPLE_MAP, maps / "soc-agent.yaml")
    shutil.copy(EXTRA, maps / "extra.yaml")
    idp = DevIssuer(d)
    cfg = broker_config(bao, identity, scope_map_path=maps, approvers=ApproverConfig(
        issuer=DevIssuer.ISSUER, jwks_path=idp.jwks_path))
    server = BrokerServer(cfg)
    server.start()
    admin_stub(server.port, identity.ca, svid(identity.ca, ADMIN)).Freeze(
        pb.FreezeRequest(action_class="sdk.frozen", reason="frozen for the SDK tests"),
        timeout=10)
    sidecars = {name: start_sidecar(identity, name, f"127.0.0.1:{server.port}",
                                    d / f"{name[:3]}.sock")
                for name in ("triage", "containment")}
    yield Stack(broker=server, identity=identity, idp=idp, sidecars=sidecars,
                vault_addr=bao.addr)
    for sc in sidecars.values():
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()
    server.stop(grace=0)
