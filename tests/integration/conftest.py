"""Real servers for integration tests: OpenBao dev, the dev Workload API, the broker, a sidecar.

Everything runs on loopback or unix sockets in a temporary directory; ports are
chosen by the OS.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hvac
import pytest

from broker.config import BrokerConfig
from broker.core.scopemap import ScopeMap, parse_scope_map
from broker.grpc.server import BrokerServer
from broker.options import DEFAULT_BROKER_DNS
from credbroker_dev.devspiffe import DevCA, DevWorkloadApi
from credbroker_dev.devstack import OpenBaoDev
from sidecar.app import SidecarHttpServer, SidecarService
from sidecar.broker_client import BrokerClient
from sidecar.client import SidecarClient
from sidecar.config import SidecarConfig

TEST_MAP = Path(__file__).parent.parent / "data" / "test-scope-map.yaml"
TRIAGE = "spiffe://example.org/agent/triage"
CONTAINMENT = "spiffe://example.org/agent/containment"
BROKER = "spiffe://example.org/credbroker/broker"
ADMIN = "spiffe://example.org/credbroker/admin"


@pytest.fixture(scope="session")
def short_tmp() -> Iterator[Path]:
    # unix socket paths must stay under ~100 bytes: pytest's tmp_path can be longer
    d = Path(tempfile.mkdtemp(prefix="cbt-"))
    yield d


@pytest.fixture(scope="session")
def bao(short_tmp: Path) -> Iterator[OpenBaoDev]:
    server = OpenBaoDev(short_tmp)
    server.start()
    yield server
    server.stop()


def root_client(bao: OpenBaoDev) -> hvac.Client:
    """``bao`` as its root token sees it: how a test asks OpenBao what is true."""
    return hvac.Client(url=bao.addr, token=bao.root_token)


@pytest.fixture(scope="module")
def own(short_tmp: Path) -> Iterator[OpenBaoDev]:
    """An OpenBao of the test module's own: no other module's broker writes to it."""
    server = OpenBaoDev(Path(tempfile.mkdtemp(prefix="own-", dir=short_tmp)))
    server.start()
    root_client(server).secrets.kv.v2.create_or_update_secret(path="soc/enrichment/ti",
                                                              secret={"k": "v"})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def root(own: OpenBaoDev) -> hvac.Client:
    return root_client(own)


@pytest.fixture(scope="module")
def smap() -> ScopeMap:
    """The test scope map, parsed."""
    return parse_scope_map([(str(TEST_MAP), TEST_MAP.read_text())])


@pytest.fixture(scope="session")
def vault_root(bao: OpenBaoDev) -> hvac.Client:
    client = hvac.Client(url=bao.addr, token=bao.root_token)
    client.secrets.kv.v2.create_or_update_secret(path="soc/enrichment/ti", secret={"k": "v"})
    client.secrets.kv.v2.create_or_update_secret(path="soc/containment/edr", secret={"k": "v"})
    return client


@dataclass
class Identity:
    ca: DevCA
    api: DevWorkloadApi
    dir: Path

    def socket(self, name: str) -> str:
        return "unix:" + str(self.dir / f"{name}.sock")


@pytest.fixture(scope="session")
def identity(short_tmp: Path) -> Iterator[Identity]:
    ca = DevCA("example.org", now=datetime.now(UTC))
    api = DevWorkloadApi(ca, svid_ttl=timedelta(minutes=30))
    d = short_tmp / "wl"
    api.add_workload(BROKER, str(d / "broker.sock"), dns_names=(DEFAULT_BROKER_DNS,))
    api.add_workload(TRIAGE, str(d / "triage.sock"))
    api.add_workload(CONTAINMENT, str(d / "containment.sock"))
    api.add_workload(ADMIN, str(d / "admin.sock"))
    api.start()
    yield Identity(ca=ca, api=api, dir=d)
    api.stop()


def broker_config(bao: OpenBaoDev, identity: Identity, **overrides: object) -> BrokerConfig:
    own = Path(tempfile.mkdtemp(prefix="audit-", dir=identity.dir.parent))
    values: dict[str, object] = {
        "audit_path": own / "audit.log",
        "registry_path": own / "registry.db",
        "admin_ids": (ADMIN,),
        # The test admin SVID acts as configured automation (recorded "automation:<ADMIN>"),
        # so revocation tests need no person; the tests of people override this with ().
        "automation_ids": (ADMIN,),
        "audit_key_path": own / "audit.key",
        "listen": "127.0.0.1:0",
        "workload_api_socket": identity.socket("broker"),
        "scope_map_path": TEST_MAP,
        "vault_addr": bao.addr,
        "vault_token": bao.root_token,
        # Many brokers with different maps share the session's OpenBao: a background drift
        # check would rewrite another test's roles mid-test. Drift tests own their OpenBao.
        "vault_drift_interval": 0,
    }
    values.update(overrides)
    return BrokerConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def broker(bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client) -> Iterator[BrokerServer]:
    server = BrokerServer(broker_config(bao, identity))
    server.start()
    yield server
    server.stop(grace=1)


@dataclass
class Sidecar:
    client: SidecarClient
    service: SidecarService
    http: SidecarHttpServer


def start_sidecar(identity: Identity, name: str, broker_addr: str, sock: Path,
                  **overrides: object) -> Sidecar:
    values: dict[str, object] = {
        "listen_socket": sock,
        "workload_api_socket": identity.socket(name),
        "broker_addr": broker_addr,
    }
    values.update(overrides)
    cfg = SidecarConfig(**values)  # type: ignore[arg-type]
    client = BrokerClient(cfg)
    service = SidecarService(client)
    service.start_watching()
    http = SidecarHttpServer(cfg.listen_socket, service, loop=client.loop)
    http.serve_in_thread()
    return Sidecar(client=SidecarClient(str(sock)), service=service, http=http)


@pytest.fixture(scope="session")
def sidecars(
    identity: Identity, broker: BrokerServer, short_tmp: Path
) -> Iterator[dict[str, Sidecar]]:
    out = {name: start_sidecar(identity, name, f"127.0.0.1:{broker.port}",
                               short_tmp / f"sc-{name}.sock")
           for name in ("triage", "containment")}
    yield out
    for sc in out.values():
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()


def vault_as(bao: OpenBaoDev, token: str) -> hvac.Client:
    return hvac.Client(url=bao.addr, token=token)


def live_accessors(vault_root: hvac.Client) -> set[str]:
    resp = vault_root.list("auth/token/accessors")
    return set(resp["data"]["keys"]) if resp else set()


