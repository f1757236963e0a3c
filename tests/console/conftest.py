"""A real dev stack (OpenBao, Workload API, broker, sidecars, dev IdP, console) and a real
browser: Playwright driving Debian's Chromium (Playwright's own download cannot be used)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from credbroker_dev.devstack import DevStack

CHROMIUM = os.environ.get("CREDBROKER_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def stack() -> Iterator[DevStack]:
    run_dir = Path(tempfile.mkdtemp(prefix="cbc-"))  # short: unix socket paths
    s = DevStack(run_dir=run_dir)
    s.start()
    yield s
    s.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)")
    # launch() gives the browser a fresh temporary profile (user-data-dir) of its own.
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Screenshots of each page; CONSOLE_SCREENSHOTS_DIR=DIR also copies them there."""
    return tmp_path_factory.mktemp("console-screenshots")
