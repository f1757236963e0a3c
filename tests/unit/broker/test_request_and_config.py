"""Wire-request validation and configuration building: pure, every bad input named."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.config import broker_config_from, load_scope_map
from broker.errors import ConfigError, InvalidRequestError, ScopeMapError
from broker.grpc.service import request_from_proto
from sidecar.config import sidecar_config_from

EXAMPLE = Path(__file__).parents[3] / "broker" / "examples" / "soc-scope-map.yaml"


def test_request_is_built_from_the_wire() -> None:
    req = request_from_proto(pb.IssueCredentialRequest(
        action_class=" enrichment ", target="h", justification="j", ttl_seconds=60,
        initiating_event=pb.InitiatingEvent(source="s", id="1", summary="x")))
    assert req.action_class == "enrichment" and req.ttl_seconds == 60
    assert req.initiating_event is not None and req.initiating_event.summary == "x"
    assert request_from_proto(pb.IssueCredentialRequest(action_class="a")).initiating_event \
        is None


@pytest.mark.parametrize(("msg", "words"), [
    (pb.IssueCredentialRequest(), "action_class is required"),
    (pb.IssueCredentialRequest(action_class="a" * 129), "longer than 128"),
    (pb.IssueCredentialRequest(action_class="a", target="t" * 257), "target is longer"),
    (pb.IssueCredentialRequest(action_class="a", ttl_seconds=3601), "hard limit"),
    (pb.IssueCredentialRequest(action_class="a",
                               initiating_event=pb.InitiatingEvent(id="1")), "source and id"),
    (pb.IssueCredentialRequest(action_class="a", initiating_event=pb.InitiatingEvent(
        source="s", id="1", summary="x" * 1025)), "initiating_event.summary"),
])
def test_bad_requests(msg: pb.IssueCredentialRequest, words: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        request_from_proto(msg)
    assert words in str(err.value)


@pytest.mark.parametrize("field", ["request_id", "approval_id"])
@pytest.mark.parametrize("value", [
    "a" * 129,  # too long
    "x" * 1_000_000,  # the attack: a megabyte of id
    "r1\n2026-01-01 INFO credbroker.broker forged",  # a line break
    "r1\r", "r\x00", "r 1", "r/1", "réq", "r\u2028",
])
def test_ids_must_match_the_strict_charset(field: str, value: str) -> None:
    msg = pb.IssueCredentialRequest(action_class="enrichment")
    setattr(msg, field, value)
    with pytest.raises(InvalidRequestError) as err:
        request_from_proto(msg)
    message = str(err.value)
    assert field in message
    assert ("A-Z a-z 0-9 . _ : -" in message) or "longer than 128" in message
    assert value not in message and "\n" not in message  # never echoed back


@pytest.mark.parametrize("value", ["0123456789abcdef", "apr-1a2b3c", "bg-ff.01:x_y",
                                   "A" * 128])
def test_well_formed_ids_are_accepted(value: str) -> None:
    request_from_proto(pb.IssueCredentialRequest(action_class="a", request_id=value,
                                                 approval_id=value))


@pytest.mark.parametrize(("field", "limit"), [("justification", 2048), ("target", 256)])
def test_free_text_is_bounded(field: str, limit: int) -> None:
    ok = pb.IssueCredentialRequest(action_class="a")
    setattr(ok, field, "x" * limit)
    request_from_proto(ok)
    setattr(ok, field, "x" * (limit + 1))
    with pytest.raises(InvalidRequestError, match=f"{field} is longer than {limit}"):
        request_from_proto(ok)


ENV = {"VAULT_TOKEN": "s.secret", "VAULT_ADDR": "http://127.0.0.1:8200",
       "SPIFFE_ENDPOINT_SOCKET": "unix:/run/spire/agent.sock",
       "CREDBROKER_AUDIT_LOG": "/var/lib/credbroker/audit.log",
       "CREDBROKER_AUDIT_KEY": "/etc/credbroker/audit.key",
       "CREDBROKER_REGISTRY": "/var/lib/credbroker/registry.db",
       "CREDBROKER_ADMIN_IDS": "spiffe://example.org/credbroker/admin"}


def test_broker_config_from_env_and_flags() -> None:
    cfg = broker_config_from(env=ENV, flags={"scope_map": "m.yaml", "listen": "0.0.0.0:9443"})
    assert cfg.listen == "0.0.0.0:9443"
    assert cfg.workload_api_socket == "unix:/run/spire/agent.sock"
    assert "s.secret" not in repr(cfg)
    flagged = broker_config_from(env=ENV, flags={"scope_map": "m.yaml",
                                                 "vault_addr": "https://v:8200/",
                                                 "workload_api": "/tmp/x.sock"})
    assert flagged.vault_addr == "https://v:8200"
    assert flagged.workload_api_socket == "unix:/tmp/x.sock"


def test_vault_allowed_mounts_and_drift_interval() -> None:
    cfg = broker_config_from(env=ENV, flags={"scope_map": "m"})
    assert cfg.vault_allowed_mounts == ("secret/",) and cfg.vault_drift_interval == 30.0
    env = {**ENV, "CREDBROKER_VAULT_ALLOWED_MOUNTS": "kv/soc, secret/"}
    assert broker_config_from(env=env, flags={"scope_map": "m"}).vault_allowed_mounts == (
        "kv/soc/", "secret/")
    flagged = broker_config_from(env=env, flags={"scope_map": "m",
                                                 "vault_allowed_mount": ["transit"],
                                                 "vault_drift_interval": 0})
    assert flagged.vault_allowed_mounts == ("transit/",)  # flags win over the environment
    assert flagged.vault_drift_interval == 0


def test_responder_groups_and_automation_ids() -> None:
    cfg = broker_config_from(env=ENV, flags={"scope_map": "m"})
    assert cfg.responder_groups == ("responders",) and cfg.automation_ids == ()
    env = {**ENV, "CREDBROKER_RESPONDER_GROUPS": "ir-oncall, soc-leads",
           "CREDBROKER_AUTOMATION_IDS": "spiffe://example.org/soar"}
    cfg = broker_config_from(env=env, flags={"scope_map": "m"})
    assert cfg.responder_groups == ("ir-oncall", "soc-leads")
    assert cfg.automation_ids == ("spiffe://example.org/soar",)
    flagged = broker_config_from(env=env, flags={
        "scope_map": "m", "responder_group": ["sre"],
        "automation_id": ["spiffe://example.org/other"]})
    assert flagged.responder_groups == ("sre",)  # flags win over the environment
    assert flagged.automation_ids == ("spiffe://example.org/other",)
    with pytest.raises(ConfigError, match="--automation-id"):
        broker_config_from(env=ENV, flags={"scope_map": "m",
                                           "automation_id": ["spiffe://Bad/x"]})


def test_vault_token_file(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("s.fromfile\n")
    assert broker_config_from(env={**ENV, "VAULT_TOKEN": ""}, flags={
        "scope_map": "m", "vault_token_file": str(f)}).vault_token == "s.fromfile"
    with pytest.raises(ConfigError, match="cannot read --vault-token-file"):
        broker_config_from(env=ENV, flags={"scope_map": "m",
                                           "vault_token_file": str(tmp_path / "none")})
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe s.x")
    with pytest.raises(ConfigError) as err:
        broker_config_from(env=ENV, flags={"scope_map": "m", "vault_token_file": str(binary)})
    assert str(err.value) == (f"--vault-token-file {binary} is not a text file (a Vault token "
                              "is text): write the token alone into it")


@pytest.mark.parametrize(("env", "kw", "words"), [
    ({**ENV, "VAULT_TOKEN": ""}, {"scope_map": "m"}, "no Vault token"),
    ({**ENV, "VAULT_ADDR": ""}, {"scope_map": "m"}, "Vault address"),
    (ENV, {}, "no scope map"),
    ({**ENV, "SPIFFE_ENDPOINT_SOCKET": ""}, {"scope_map": "m"}, "Workload API socket"),
    ({**ENV, "SPIFFE_ENDPOINT_SOCKET": "tcp://x"}, {"scope_map": "m"}, "absolute unix socket"),
    (ENV, {"scope_map": "m", "listen": "8443"}, "must be host:port"),
    ({**ENV, "CREDBROKER_AUDIT_LOG": ""}, {"scope_map": "m"}, "no audit log"),
    ({**ENV, "CREDBROKER_AUDIT_KEY": ""}, {"scope_map": "m"}, "no checkpoint signing key"),
    (ENV, {"scope_map": "m", "checkpoint_interval": 0}, "positive number"),
    ({**ENV, "CREDBROKER_REGISTRY": ""}, {"scope_map": "m"}, "no credential registry"),
    (ENV, {"scope_map": "m", "admin_id": ["spiffe://Admin/x"]}, "--admin-id"),
    (ENV, {"scope_map": "m", "vault_allowed_mount": ["sys"]}, "can never be allowed"),
    ({**ENV, "CREDBROKER_VAULT_ALLOWED_MOUNTS": "secret,auth"}, {"scope_map": "m"},
     "can never be allowed"),
    (ENV, {"scope_map": "m", "vault_allowed_mount": ["kv/*"]}, "not a mount path"),
    (ENV, {"scope_map": "m", "vault_drift_interval": -1}, "--vault-drift-interval"),
])
def test_broker_config_errors(env: dict[str, str], kw: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError) as err:
        broker_config_from(env=env, flags=kw)
    assert words in str(err.value)
    assert "s.secret" not in str(err.value)


def test_sidecar_config() -> None:
    cfg = sidecar_config_from(env=ENV, flags={"listen": "/run/cb/s.sock",
                                              "broker": "broker:8443"})
    assert cfg.send_jwt_svid and cfg.broker_dns_name == "broker.credbroker.internal"
    with pytest.raises(ConfigError, match="no agent socket"):
        sidecar_config_from(env=ENV, flags={"broker": "b:1"})
    with pytest.raises(ConfigError, match="--broker"):
        sidecar_config_from(env=ENV, flags={"listen": "/s.sock"})


def test_load_scope_map_file_and_directory(tmp_path: Path) -> None:
    assert "enrichment" in load_scope_map(EXAMPLE).classes
    (tmp_path / "a.yaml").write_text(EXAMPLE.read_text())
    (tmp_path / "notes.txt").write_text("ignored")
    assert load_scope_map(tmp_path).classes.keys() == load_scope_map(EXAMPLE).classes.keys()
    with pytest.raises(ConfigError, match="cannot read scope map"):
        load_scope_map(tmp_path / "missing.yaml")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no"):
        load_scope_map(empty)
    (tmp_path / "b.yaml").write_text(EXAMPLE.read_text())
    with pytest.raises(ScopeMapError, match="defined twice"):
        load_scope_map(tmp_path)
