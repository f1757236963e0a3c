"""Declaring environments: --default-environment, --environment NAME=URL,..., and the
rules a request's environment name is resolved by."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.adapters.environments import IMPLICIT, Environments, split_entity, tag_entity
from broker.adapters.vault import VaultAdapter
from broker.cli.main import build_parser
from broker.config import broker_config_from
from broker.core.scopemap import parse_scope_map
from broker.errors import ConfigError, UnknownEnvironmentError
from broker.grpc.server import environments_of
from broker.options import BROKER_OPTIONS, flag_values, read_config_file

ENV = {"VAULT_TOKEN": "s.env-token", "VAULT_ADDR": "http://127.0.0.1:8200",
       "SPIFFE_ENDPOINT_SOCKET": "unix:/run/spire/agent.sock",
       "CREDBROKER_AUDIT_LOG": "/var/audit.log", "CREDBROKER_AUDIT_KEY": "/etc/audit.key",
       "CREDBROKER_REGISTRY": "/var/registry.db", "CREDBROKER_SCOPE_MAP": "/etc/map.yaml"}
SECRET = "s.sandbox-secret-token"


def cfg(*argv: str, env: dict[str, str] | None = None, config: Path | None = None) -> object:
    args = build_parser().parse_args(["serve", *(["--config", str(config)] if config else []),
                                      *argv])
    return broker_config_from(env=env or {**ENV, "SANDBOX_TOKEN": SECRET},
                              flags=flag_values(args, BROKER_OPTIONS),
                              file=read_config_file(args.config, BROKER_OPTIONS))


def test_none_declared_is_one_implicit_environment() -> None:
    c = cfg()
    assert c.default_environment == IMPLICIT and c.environments == ()  # type: ignore[attr-defined]
    vaults = environments_of(c, VaultAdapter(addr="http://127.0.0.1:8200", token="t"))  # type: ignore[arg-type]
    assert not vaults.declared and vaults.names == (IMPLICIT,)
    assert vaults.resolve("") == "" and vaults.resolve("default") == ""
    with pytest.raises(UnknownEnvironmentError, match=r"known: default\)"):
        vaults.resolve("sandbox")


def test_flags_declare_the_default_and_more(tmp_path: Path) -> None:
    token = tmp_path / "sandbox.token"
    token.write_text(SECRET + "\n")
    c = cfg("--default-environment", "production",
            "--environment", f"sandbox=http://10.0.0.2:8200/,token-file={token},namespace=soc",
            "--environment", "lab=https://lab:8200,token-env=SANDBOX_TOKEN")
    assert c.default_environment == "production"  # type: ignore[attr-defined]
    sandbox, lab = c.environments  # type: ignore[attr-defined]
    assert (sandbox.name, sandbox.addr, sandbox.token, sandbox.token_file, sandbox.namespace) \
        == ("sandbox", "http://10.0.0.2:8200", SECRET, token, "soc")
    assert (lab.name, lab.addr, lab.token) == ("lab", "https://lab:8200", SECRET)
    for shown in (repr(c), repr(sandbox), str(lab)):
        assert SECRET not in shown
    default = VaultAdapter(addr="http://127.0.0.1:8200", token="t")
    vaults = environments_of(c, default)  # type: ignore[arg-type]
    assert vaults.declared and vaults.names == ("production", "sandbox", "lab")
    assert vaults.resolve("") == "production" and vaults.resolve("lab") == "lab"
    assert vaults.vault("") is default and vaults.vault("production") is default
    assert vaults.vault("sandbox").addr == "http://10.0.0.2:8200"
    with pytest.raises(UnknownEnvironmentError) as err:
        vaults.resolve("prod")
    assert str(err.value) == ("environment 'prod' is not one this broker declares (known: "
                              "production, sandbox, lab); name one of them, or none for "
                              "'production'")


def test_a_config_file_lists_them_too(tmp_path: Path) -> None:
    f = tmp_path / "broker.yaml"
    f.write_text("default_environment: production\n"
                 "environment: ['sandbox=http://10.0.0.2:8200,token-env=SANDBOX_TOKEN']\n")
    c = cfg(config=f)
    assert [e.name for e in c.environments] == ["sandbox"]  # type: ignore[attr-defined]


def test_naming_only_the_default_declares_it() -> None:
    c = cfg("--default-environment", "production")
    vaults = environments_of(c, VaultAdapter(addr="http://127.0.0.1:8200", token="t"))  # type: ignore[arg-type]
    assert vaults.declared and vaults.resolve("") == "production"


@pytest.mark.parametrize(("entry", "message"), [
    ("sandbox", "expected NAME=URL[,token-file=PATH][,token-env=VAR][,namespace=NS][,ca=PATH]"),
    ("Sandbox=http://x:1,token-env=SANDBOX_TOKEN", "must be lower-case letters"),
    ("sandbox=vault:8200,token-env=SANDBOX_TOKEN", "must be an http(s) URL"),
    ("sandbox=http://x:1", "no Vault token: add token-file=PATH"),
    ("sandbox=http://x:1,token=s.abc", "unknown or empty setting 'token'"),
    ("sandbox=http://x:1,token-env=NOPE", "the environment variable NOPE named by token-env "
                                          "is not set"),
    ("sandbox=http://x:1,token-file=/nonexistent/t", "cannot read token-file /nonexistent/t"),
    ("default=http://x:1,token-env=SANDBOX_TOKEN", "environment 'default' is declared twice"),
])
def test_bad_entries_say_what_to_write(entry: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg("--environment", entry)
    assert message in str(err.value)
    assert SECRET not in str(err.value)


def test_a_token_file_that_is_not_text_says_so(tmp_path: Path) -> None:
    binary = tmp_path / "t"
    binary.write_bytes(b"\xff\xfe s.x")
    with pytest.raises(ConfigError) as err:
        cfg("--environment", f"sandbox=http://x:1,token-file={binary}")
    assert f"token-file {binary} is not a text file" in str(err.value)


def test_the_broker_refuses_a_map_naming_environments_it_does_not_declare() -> None:
    m = parse_scope_map([("m.yaml", "apiVersion: credbroker/v1\nkind: ScopeMap\n"
                          "environments: [production, sandbox]\naction_classes:\n"
                          "  a:\n    risk: low\n    owner: {team: t, contact: c}\n"
                          "    escalation: [e]\n    workloads: [spiffe://example.org/x]\n"
                          "    credential: {ttl: 1m, max_ttl: 1m, vault_policy: "
                          "[{path: secret/data/x, capabilities: [read]}]}\n"
                          "    environments: {sandbox: allow}\n")])
    default = VaultAdapter(addr="http://127.0.0.1:8200", token="t")
    with pytest.raises(ConfigError) as err:
        Environments.single(default).check_scope_map(m)
    assert "declares environment(s) production, sandbox that this broker does not (it knows " \
           "default)" in str(err.value)
    both = Environments({"production": default,
                         "sandbox": VaultAdapter(addr="http://127.0.0.1:8201", token="t")},
                        default="production", declared=True)
    both.check_scope_map(m)
    assert list(both.scope_map_for(m, "sandbox").classes) == ["a"]
    assert list(both.scope_map_for(m, "production").classes) == []


def test_entity_ids_carry_their_environment() -> None:
    assert split_entity(tag_entity("sandbox", "e-1")) == ("sandbox", "e-1")
    assert tag_entity("", "e-1") == "e-1" and split_entity("e-1") == ("", "e-1")
