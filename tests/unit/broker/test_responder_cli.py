"""The responder's CLI before it reaches a broker: parsing, environment, version, completion.

Each case runs as a person would type it (``python -m broker.cli.main ...`` in a subprocess
where a traceback would show) or through the in-process ``main``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from broker import __version__
from broker.cli.main import build_parser, main
from broker.cli.responder import broker_location
from broker.errors import ConfigError
from broker.options import DEFAULT_BROKER_DNS

ROOT = Path(__file__).parents[3]


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker.cli.main", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv", [
    ["revoke", "--since", "10 minutes", "--reason", "x"],
    ["revoke", "--since", "2026-11-27T03:00:00", "--reason", "x", "--yes"],
    ["revoke", "--until", "yesterday"],
    ["credentials", "list", "--since", "2026-11-27"],
])
def test_a_bad_time_is_one_line_and_exit_2_not_a_traceback(argv: list[str],
                                                           tmp_path: Path) -> None:
    r = cli(*argv, "--dev", str(tmp_path))  # no dev stack there: refused before connecting
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "is not a time; write a duration back from now (30s, 10m, 2h, 1d) or an RFC 3339 " \
           "time with a zone" in r.stderr


def test_acting_needs_a_reason_previewing_does_not(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["revoke", "--all", "--yes"], ["freeze", "--action-class", "x", "--yes"],
                 ["unfreeze", "--action-class", "x", "--yes", "--reason", " "]):
        assert main([*argv, "--dev", str(tmp_path)]) == 2
        assert "--reason is required with --yes" in capsys.readouterr().err
    # A preview gets as far as looking for the broker (no dev stack here): no --reason asked.
    assert main(["revoke", "--all", "--dev", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot read {tmp_path / 'dev.json'}" in err and "--reason" not in err


def _args(**kw: str | None) -> argparse.Namespace:
    base: dict[str, str | None] = {"broker": None, "workload_api": None,
                                   "broker_dns_name": None}
    return argparse.Namespace(**(base | kw))


def test_the_broker_is_found_from_the_environment_and_flags_win() -> None:
    env = {"CREDBROKER_BROKER": "broker.soc:8443", "SPIFFE_ENDPOINT_SOCKET": "unix:/run/a.sock",
           "CREDBROKER_BROKER_DNS": "cb.soc"}
    assert broker_location(_args(), env) == ("broker.soc:8443", "unix:/run/a.sock", "cb.soc")
    assert broker_location(_args(broker="other:1", workload_api="/x.sock",
                                 broker_dns_name="d"), env) == ("other:1", "/x.sock", "d")
    # The sidecar's variable works too; the DNS name has its default.
    assert broker_location(_args(), {"CREDBROKER_BROKER_ADDR": "b:1",
                                     "SPIFFE_ENDPOINT_SOCKET": "/s"})[::2] == (
        "b:1", DEFAULT_BROKER_DNS)


def test_where_is_the_broker_names_what_is_missing() -> None:
    with pytest.raises(ConfigError) as err:
        broker_location(_args(), {"SPIFFE_ENDPOINT_SOCKET": "unix:/run/a.sock"})
    msg = str(err.value)
    assert "--broker HOST:PORT or $CREDBROKER_BROKER" in msg and "Workload API" not in msg
    with pytest.raises(ConfigError) as err:
        broker_location(_args(broker="b:1"), {})
    assert "$SPIFFE_ENDPOINT_SOCKET" in str(err.value) and "$CREDBROKER_BROKER)" not in \
        str(err.value)


def test_version() -> None:
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"credbroker {__version__}"


def _complete(script: Path, line: str) -> list[str]:
    """What bash completes for ``line`` (the cursor at its end) with the generated script."""
    prog = ('source "$1"; read -ra COMP_WORDS <<< "$2"; [[ "$2" == *" " ]] && COMP_WORDS+=("");'
            ' COMP_CWORD=$((${#COMP_WORDS[@]}-1)); _credbroker; printf "%s\\n" "${COMPREPLY[@]}"')
    r = subprocess.run(["bash", "-c", prog, "-", str(script), line], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts_are_valid_shell(shell: str, tmp_path: Path) -> None:
    r = cli("completion", shell)
    assert r.returncode == 0 and "_credbroker" in r.stdout
    script = tmp_path / f"credbroker.{shell}"
    script.write_text(r.stdout)
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    if shell == "zsh":
        assert r.stdout.startswith("#compdef credbroker") and "bashcompinit" in r.stdout


def test_bash_completion_follows_the_parser(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "bash"]) == 0
    script = tmp_path / "credbroker.bash"
    script.write_text(capsys.readouterr().out)
    top = _complete(script, "credbroker ")
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(top) == set(sub.choices)
    assert _complete(script, "credbroker cred") == ["credentials"]
    assert _complete(script, "credbroker credentials ") == ["list"]
    assert "--action-class" in _complete(script, "credbroker credentials list --")
    assert _complete(script, "credbroker audit export --format ") == ["jsonl", "ocsf"]
    # A flag's value is not mistaken for a command word.
    assert "--yes" in _complete(script, "credbroker revoke --reason audit --")
    assert _complete(script, "credbroker completion ") == ["bash", "zsh"]
