"""Each option declared once (broker/options.py): flags > environment > config file > defaults,
the README's tables, and secrets never shown (issue #12 step 7)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from broker.cli.main import build_parser, serve_file_keys
from broker.config import broker_config_from, vault_access_from
from broker.errors import ConfigError
from broker.options import (
    BROKER_OPTIONS,
    SIDECAR_OPTIONS,
    VAULT_SYNC_OPTIONS,
    Option,
    flag_values,
    markdown_table,
    read_config_file,
    resolve,
)
from sidecar.config import sidecar_config_from

ROOT = Path(__file__).parents[3]
ALL = [*(("serve", o) for o in BROKER_OPTIONS), *(("sidecar", o) for o in SIDECAR_OPTIONS)]


def _ids(case: tuple[str, Option]) -> str:
    return f"{case[0]}:{case[1].name}"


def _samples(o: Option) -> tuple[Any, str, Any, Any]:
    """(flag value, env text, file value, the value each must resolve to: flag, env, file)."""
    if o.kind == "list":
        return ["from-flag"], "from-env", ["from-file"], (("from-flag",), ("from-env",),
                                                          ("from-file",))
    if o.kind == "number":
        return 3.0, "2", 1, (3.0, 2.0, 1.0)
    if o.kind == "switch":
        return True, "true", True, (True, True, True)
    return "from-flag", "from-env", "from-file", ("from-flag", "from-env", "from-file")


@pytest.mark.parametrize("case", ALL, ids=_ids)
def test_flags_beat_environment_beat_config_file_beat_defaults(case: tuple[str, Option]
                                                              ) -> None:
    _, o = case
    flag, env_text, file_value, (want_flag, want_env, want_file) = _samples(o)
    env = {e: env_text for e in o.env}
    flags = {o.name: flag} if o.flag else {}
    file = {o.name: file_value} if o.in_file else {}

    def got(**kw: Any) -> Any:
        setting = resolve([o], **{"flags": {}, "env": {}, "file": {}, **kw})[o.name]
        return setting.value, setting.source

    assert got() == (o.default, "default")
    if o.in_file:
        assert got(file=file) == (want_file, "file")
    if o.env:
        assert got(env=env, file=file) == (want_env, "env")
        assert got(env={e: "" for e in o.env}, file=file)[1] == ("file" if o.in_file
                                                                  else "default")
    if o.flag:
        assert got(flags=flags, env=env, file=file) == (want_flag, "flag")


def test_each_option_is_a_flag_of_its_command_and_a_key_of_the_config_file() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, options in (("serve", BROKER_OPTIONS), ("sidecar", SIDECAR_OPTIONS)):
        flags = {s for a in sub.choices[command]._actions for s in a.option_strings}
        assert {o.flag for o in options if o.flag} == flags - {"-h", "--help"}
    assert set(serve_file_keys()) == {o.name for o in BROKER_OPTIONS
                                      if o.name not in ("config", "ready_file", "vault_token")}
    vault = sub.choices["vault"]
    sync = next(a for a in vault._actions if isinstance(a, argparse._SubParsersAction))
    sync_flags = {s for a in sync.choices["sync"]._actions for s in a.option_strings}
    assert {o.flag for o in VAULT_SYNC_OPTIONS if o.flag} <= sync_flags


ENV = {"VAULT_TOKEN": "s.env-token", "VAULT_ADDR": "http://127.0.0.1:8200",
       "SPIFFE_ENDPOINT_SOCKET": "unix:/run/spire/agent.sock",
       "CREDBROKER_AUDIT_LOG": "/var/audit.log", "CREDBROKER_AUDIT_KEY": "/etc/audit.key",
       "CREDBROKER_REGISTRY": "/var/registry.db", "CREDBROKER_SCOPE_MAP": "/etc/map.yaml"}


def test_the_command_line_config_file_and_environment_meet_in_that_order(tmp_path: Path
                                                                        ) -> None:
    """The finding: a config-file value used to beat the environment, against --help."""
    f = tmp_path / "broker.yaml"
    f.write_text("listen: 127.0.0.1:1111\naudience: from-file\ncheckpoint_interval: 5\n"
                 "admin_id: [spiffe://example.org/file-admin]\nrequire_jwt_svid: true\n")
    env = {**ENV, "CREDBROKER_LISTEN": "127.0.0.1:2222",
           "CREDBROKER_ADMIN_IDS": "spiffe://example.org/env-admin"}

    def cfg(*argv: str, env: dict[str, str] = env) -> Any:
        args = build_parser().parse_args(["serve", "--config", str(f), *argv])
        return broker_config_from(env=env, flags=flag_values(args, BROKER_OPTIONS),
                                  file=read_config_file(args.config, BROKER_OPTIONS))

    c = cfg()
    assert c.listen == "127.0.0.1:2222"  # environment over file
    assert c.jwt_audience == "from-file" and c.checkpoint_interval == 5.0  # file over default
    assert c.admin_ids == ("spiffe://example.org/env-admin",)
    assert c.require_jwt_svid is True
    c = cfg("--listen", "127.0.0.1:3333", "--admin-id", "spiffe://example.org/flag-admin")
    assert c.listen == "127.0.0.1:3333"  # flag over environment
    assert c.admin_ids == ("spiffe://example.org/flag-admin",)
    assert cfg(env=ENV).listen == "127.0.0.1:1111"
    assert broker_config_from(env=ENV).listen == "127.0.0.1:8443"  # the default


def test_the_vault_token_is_one_setting_spelled_two_ways(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s.file-token\n")
    by_flag = broker_config_from(env=ENV, flags={"vault_token_file": str(token_file)})
    assert by_flag.vault_token == "s.file-token" and by_flag.vault_token_file == token_file
    in_file = broker_config_from(env=ENV, file={"vault_token_file": str(token_file)})
    assert in_file.vault_token == "s.env-token" and in_file.vault_token_file is None
    no_env = broker_config_from(env={**ENV, "VAULT_TOKEN": ""},
                                file={"vault_token_file": str(token_file)})
    assert no_env.vault_token == "s.file-token"
    with pytest.raises(ConfigError, match="unknown key"):
        read_config_file(str(_write(tmp_path / "c.yaml", "vault_token: s.x\n")), BROKER_OPTIONS)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_secrets_never_appear_in_reprs_or_errors(tmp_path: Path) -> None:
    secret = "s.very-secret-token"
    env = {**ENV, "VAULT_TOKEN": secret}
    cfg = broker_config_from(env=env)
    assert cfg.vault_token == secret
    settings = resolve(BROKER_OPTIONS, flags={}, env=env, file={})
    access = vault_access_from(env=env, flags={})
    for shown in (repr(cfg), str(cfg), repr(settings), str(settings), repr(access)):
        assert secret not in shown, shown
    assert "<redacted>" in repr(settings["vault_token"])
    for o in BROKER_OPTIONS:
        assert not (o.secret and o.flag), f"{o.name} is a secret: it must never be a flag"
        assert not (o.secret and o.in_file), f"{o.name} is a secret: not in a config file"
    help_text = build_parser().format_help()
    assert secret not in help_text
    with pytest.raises(ConfigError) as err:
        broker_config_from(env={**env, "VAULT_ADDR": "nope"})
    assert secret not in str(err.value)


@pytest.mark.parametrize(("options", "heading"), [(BROKER_OPTIONS, "broker setting"),
                                                  (SIDECAR_OPTIONS, "sidecar setting")])
def test_the_readme_tables_are_the_declarations(options: tuple[Option, ...],
                                                heading: str) -> None:
    table = markdown_table(options, heading)
    readme = (ROOT / "README.md").read_text()
    assert table in readme, ("README.md's table differs from broker/options.py; paste:\n"
                             + table)
    for o in options:
        row = next(line for line in table.splitlines() if line.startswith(f"| {o.help} |"))
        assert (f"`{o.flag}`" in row) == bool(o.flag)
        assert all(f"`{e}`" in row for e in o.env)


def test_malformed_values_name_their_source() -> None:
    with pytest.raises(ConfigError, match="config key checkpoint_interval must be a number"):
        broker_config_from(env=ENV, file={"checkpoint_interval": "often"})
    with pytest.raises(ConfigError, match="config key require_jwt_svid must be true or false"):
        broker_config_from(env=ENV, file={"require_jwt_svid": "maybe"})
    with pytest.raises(ConfigError, match="config key listen must be a single value"):
        broker_config_from(env=ENV, file={"listen": ["a", "b"]})
    sidecar = sidecar_config_from(env={**ENV, "CREDBROKER_SIDECAR_SOCKET": "/s.sock",
                                       "CREDBROKER_BROKER_ADDR": "b:1",
                                       "CREDBROKER_AUDIENCE": "aud"}, flags={})
    assert sidecar.jwt_audience == "aud" and sidecar.send_jwt_svid
