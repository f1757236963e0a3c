"""Fault injection against real servers: OpenBao one TCP hop away through a fault proxy.

The session's servers come from the integration suite's fixtures (re-exported here);
each test gets a fresh broker (in-process, or a real process when it must be killed)
on its own registry and audit log, all of which the invariant checks read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import hvac
import pytest

from broker.grpc.server import BrokerServer
from credbroker_dev.devstack import OpenBaoDev
from tests.faults.support import BrokerFiles, VaultView
from tests.integration import conftest as integration
from tests.integration.conftest import Identity, broker_config
from tests.integration.helpers import TcpProxy

# The integration suite's session servers, re-exported as fixtures of this directory.
short_tmp = integration.short_tmp
bao = integration.bao
vault_root = integration.vault_root
identity = integration.identity


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: fault injection against real servers "
                                       "(network faults, kills, a full or vanished audit log)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tracked() -> list[BrokerFiles]:
    """The files of every broker started in this session (the invariant reads them all)."""
    return []


@pytest.fixture(scope="session")
def view(vault_root: hvac.Client) -> VaultView:
    return VaultView(vault_root)


@pytest.fixture
def proxy(bao: OpenBaoDev) -> Iterator[TcpProxy]:
    """The broker's only way to OpenBao."""
    p = TcpProxy(bao.port)
    yield p
    p.release()
    p.unstall()
    p.stop_failing()
    p.slow(0)
    p.cut()


Factory = Callable[..., BrokerServer]


@pytest.fixture
def make_broker(bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client,
                tracked: list[BrokerFiles]) -> Iterator[Factory]:
    """Start an in-process broker (fast health checks); stopped after the test."""
    started: list[BrokerServer] = []

    def make(**overrides: object) -> BrokerServer:
        overrides.setdefault("health_interval", 0.2)
        cfg = broker_config(bao, identity, **overrides)
        tracked.append(BrokerFiles.of(cfg))
        server = BrokerServer(cfg)
        server.start()
        started.append(server)
        return server

    yield make
    for s in started:
        if not s.stopped.is_set():
            s.stop(grace=0)
