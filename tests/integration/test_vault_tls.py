"""Vault over TLS with a private CA: --vault-ca-cert / VAULT_CACERT / BAO_CACERT."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest

from broker.cli.main import main
from broker.config import broker_config_from
from broker.errors import ConfigError
from broker.grpc.server import BrokerServer
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import TEST_MAP, Identity, broker_config, start_sidecar


@pytest.fixture(scope="module")
def tls_bao(short_tmp: Path) -> Iterator[OpenBaoDev]:
    bao = OpenBaoDev(short_tmp, tls=True)
    bao.start()
    yield bao
    bao.stop()


def _env(monkeypatch: pytest.MonkeyPatch, bao: OpenBaoDev, **extra: str) -> None:
    for name in ("VAULT_CACERT", "BAO_CACERT", "VAULT_ADDR", "CREDBROKER_SCOPE_MAP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    for name, value in extra.items():
        monkeypatch.setenv(name, value)


def test_the_dev_server_serves_https_with_its_own_ca(tls_bao: OpenBaoDev) -> None:
    assert tls_bao.addr.startswith("https://") and tls_bao.ca_cert is not None
    assert b"BEGIN CERTIFICATE" in tls_bao.ca_cert.read_bytes()


def test_vault_sync_needs_the_ca_and_works_with_it(
        tls_bao: OpenBaoDev, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert tls_bao.ca_cert is not None
    sync = ["vault", "sync", "--scope-map", str(TEST_MAP), "--vault-addr", tls_bao.addr,
            "--json"]
    _env(monkeypatch, tls_bao)
    assert main(sync) == 5  # vault_unavailable: nothing was written
    err = capsys.readouterr().err
    assert "TLS failed" in err and "CERTIFICATE_VERIFY_FAILED" in err
    assert "--vault-ca-cert" in err and "VAULT_CACERT" in err

    assert main([*sync, "--vault-ca-cert", str(tls_bao.ca_cert)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "credbroker-enrichment" in report["policies_written"]
    for var in ("VAULT_CACERT", "BAO_CACERT"):  # like bao itself
        _env(monkeypatch, tls_bao, **{var: str(tls_bao.ca_cert)})
        assert main(sync) == 0, capsys.readouterr().err
        assert "credbroker-enrichment" in json.loads(capsys.readouterr().out)["unchanged"]


def test_the_ca_comes_from_the_flag_then_vault_cacert_then_bao_cacert(
        tls_bao: OpenBaoDev, tmp_path: Path) -> None:
    assert tls_bao.ca_cert is not None
    ca, other = str(tls_bao.ca_cert), tmp_path / "other.pem"
    other.write_bytes(tls_bao.ca_cert.read_bytes())
    env = {"VAULT_TOKEN": "t", "VAULT_ADDR": "https://vault.example:8200"}
    common: dict[str, str] = dict(scope_map="m.yaml", audit_log="a.log", audit_key="k.pem",
                                  registry="r.db", workload_api="unix:/run/spiffe/socket")

    def ca_of(env_extra: dict[str, str], flag: str | None = None) -> Path | None:
        cfg = broker_config_from(env={**env, **env_extra},
                                 flags={**common, "vault_ca_cert": flag})
        return cfg.vault_ca_cert

    assert ca_of({}) is None  # the system's trust store
    assert ca_of({"BAO_CACERT": ca}) == Path(ca)
    assert ca_of({"BAO_CACERT": str(other), "VAULT_CACERT": ca}) == Path(ca)
    assert ca_of({"VAULT_CACERT": str(other)}, flag=ca) == Path(ca)
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    for wrong in (str(bad), str(tmp_path / "missing.pem")):
        with pytest.raises(ConfigError, match="Vault CA certificate"):
            ca_of({}, flag=wrong)


def test_the_broker_mints_over_tls_with_the_ca_and_refuses_without(
        tls_bao: OpenBaoDev, identity: Identity, short_tmp: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    assert tls_bao.ca_cert is not None
    server = BrokerServer(broker_config(tls_bao, identity, vault_ca_cert=tls_bao.ca_cert))
    server.start()
    sc = start_sidecar(identity, "triage", f"127.0.0.1:{server.port}",
                       short_tmp / "sc-tls.sock")
    try:
        cred = sc.client.request_credential("enrichment", target="t-tls")
        assert cred["policies"] == ["credbroker-enrichment"]
        root = hvac.Client(url=tls_bao.addr, token=tls_bao.root_token,
                           verify=str(tls_bao.ca_cert))
        live = root.auth.token.lookup_accessor(cred["credential_id"])["data"]
        assert "credbroker-enrichment" in live["policies"] and not live["renewable"]
    finally:
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()
        server.stop(grace=0)

    caplog.set_level(logging.WARNING)
    server = BrokerServer(broker_config(tls_bao, identity))  # no CA: Vault is not trusted
    server.start()
    sc = start_sidecar(identity, "triage", f"127.0.0.1:{server.port}",
                       short_tmp / "sc-notls.sock")
    try:
        status, body = sc.client.raw("POST", "/v1/credentials", {"action_class": "enrichment"})
        assert status == 503, body
        assert body["error"]["code"] == "vault_unavailable"  # type: ignore[index]
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text and "--vault-ca-cert" in caplog.text
    finally:
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()
        server.stop(grace=0)
