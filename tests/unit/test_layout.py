"""The layout's import rules, checked in a fresh interpreter each (what a module pulls in
is what ``sys.modules`` holds after importing it).

- The sidecar imports only the wire contract (``broker.wire``, ``broker._proto``), the
  error table, the option declarations and the pure core — no broker server module.
- The production broker (``credbroker serve`` and the CLI) never imports dev tooling.
- The pure core imports nothing of the broker outside ``broker.core`` and ``broker.errors``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Layers only the broker process itself may load.
SERVER = ("broker.grpc", "broker.app", "broker.adapters", "broker.cli", "broker.console",
          "broker.config", "credbroker_dev")


def _loaded(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def _ours(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if m == "broker" or m.startswith(("broker.", "credbroker_dev")))


def test_the_sidecar_imports_only_the_wire_contract() -> None:
    mods = _ours(_loaded("import sidecar.app, sidecar.broker_client, sidecar.cache, "
                         "sidecar.config, sidecar.hits"))
    assert [m for m in mods if m.startswith(SERVER)] == []
    assert "broker.wire.tls" in mods and "broker.wire.metadata" in mods  # it does talk


def test_the_production_broker_never_imports_dev_tooling() -> None:
    mods = _ours(_loaded("import broker.grpc.server, broker.cli.main\n"
                         "broker.cli.main.build_parser()"))
    assert "broker.grpc.server" in mods
    assert [m for m in mods if m.startswith("credbroker_dev")] == []


def test_the_pure_core_imports_nothing_of_the_broker_outside_it() -> None:
    core = sorted(p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
                  for p in (ROOT / "broker" / "core").rglob("*.py")
                  if p.name != "__init__.py")
    mods = _ours(_loaded("import " + ", ".join(core)))
    assert [m for m in mods if m not in ("broker", "broker.errors")
            and not m.startswith("broker.core")] == []


def test_dev_commands_say_so_where_the_dev_tooling_is_left_out(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The container image installs the broker and the sidecar only: `credbroker dev` and
    `demo` there answer with one line saying what to do, not a traceback."""
    import importlib.util

    from broker.cli.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == "credbroker_dev" else real(name, *a))
    for command in (["demo"], ["dev"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "dev tooling" in err and "make demo" in err and "Traceback" not in err
