"""Shared test configuration: markers and helpers used by unit and integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from credbroker_dev.devpg import PgServer

# Set before grpc is imported anywhere (see broker.cli.main).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers",
                            "integration: needs real servers (OpenBao, gRPC, Workload API)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _no_personal_login(tmp_path_factory: pytest.TempPathFactory,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test has its own empty config directory: a login cached in the developer's
    ``~/.config/credbroker`` never leaks into a test, nor a test's into it."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
    monkeypatch.delenv("CREDBROKER_ID_TOKEN_FILE", raising=False)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    """A PostgreSQL server for the whole session (from the server binaries; see
    credbroker_dev.devpg)."""
    server = PgServer()
    server.start()
    yield server
    server.destroy()
