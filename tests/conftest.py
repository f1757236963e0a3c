"""Shared test configuration: markers and helpers used by unit and integration tests."""

from __future__ import annotations

import os

import pytest

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
