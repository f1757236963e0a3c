"""The sidecar's HTTP/JSON API on a unix socket, against the real broker and OpenBao."""

from __future__ import annotations

import json
import logging
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hvac.exceptions
import pytest

from broker.devspiffe import DevCA, DevWorkloadApi
from broker.devstack import OpenBaoDev, free_port
from broker.server import BrokerServer
from sidecar.client import SidecarError
from tests.integration.conftest import TRIAGE, Identity, Sidecar, start_sidecar, vault_as

ALERT = {"source": "splunk", "id": "NOTABLE-7", "summary": "beaconing"}


def _raw(sock: str, request: bytes) -> tuple[int, dict[str, object]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock)
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                if len(body) >= length:
                    break
    status = int(head.split()[1])
    return status, json.loads(body)


def test_issue_returns_the_documented_body_and_caches(sidecars: dict[str, Sidecar],
                                                      bao: OpenBaoDev) -> None:
    c = sidecars["triage"].client
    body = c.request_credential("enrichment", target="t-cache", initiating_event=ALERT,
                                justification="enrich")
    assert set(body) >= {"credential_id", "token", "expires_at", "action_class", "policies",
                         "decision", "request_id"}
    assert body["action_class"] == "enrichment"
    assert body["policies"] == ["credbroker-enrichment"]
    assert body["cached"] is False
    assert body["expires_at"].endswith("Z")
    expires = datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert timedelta(seconds=100) < expires - datetime.now(UTC) <= timedelta(seconds=121)
    assert body["decision"]["outcome"] == "allow"
    assert body["decision"]["owner"] == {"team": "soc-platform",
                                         "contact": "soc-platform@example.org"}
    again = c.request_credential("enrichment", target="t-cache")
    assert again["cached"] is True and again["credential_id"] == body["credential_id"]
    other_target = c.request_credential("enrichment", target="t-other")
    assert other_target["credential_id"] != body["credential_id"]
    assert vault_as(bao, body["token"]).secrets.kv.v2.read_secret_version(
        path="soc/enrichment/ti", raise_on_deleted_version=False)


def test_hand_back_kills_the_token_and_the_cache_entry(sidecars: dict[str, Sidecar],
                                                       bao: OpenBaoDev) -> None:
    c = sidecars["triage"].client
    body = c.request_credential("enrichment", target="t-handback")
    out = c.hand_back(body["credential_id"])
    assert out == {"credential_id": body["credential_id"], "revoked": True,
                   "already_dead": False}
    with pytest.raises(hvac.exceptions.Forbidden):
        vault_as(bao, body["token"]).secrets.kv.v2.read_secret_version(
            path="soc/enrichment/ti", raise_on_deleted_version=False)
    fresh = c.request_credential("enrichment", target="t-handback")
    assert fresh["cached"] is False and fresh["credential_id"] != body["credential_id"]


def test_agent_cannot_hand_back_another_agents_credential(sidecars: dict[str, Sidecar]) -> None:
    cred = sidecars["containment"].client.request_credential("enrichment", target="t-theft")
    with pytest.raises(SidecarError) as err:
        sidecars["triage"].client.hand_back(cred["credential_id"])
    assert err.value.status == 404 and err.value.code == "not_found"


@pytest.mark.parametrize(("body", "status", "code", "words"), [
    ({"action_class": "nope.nothing"}, 400, "unknown_action_class", "'nope.nothing'"),
    ({"action_class": "containment.isolate_host", "initiating_event": ALERT}, 403,
     "workload_not_allowed", "rule containment.isolate_host.workloads"),
    ({"action_class": "enrichment", "ttl_seconds": 100000}, 400, "bad_request", "hard limit"),
    ({"action_class": "enrichment", "ttl_seconds": 301}, 400, "ttl_above_max", "max_ttl"),
    ({"action_class": "enrichment", "ttl_seconds": "5m"}, 400, "bad_request", "ttl_seconds"),
    ({"action_class": "enrichment", "initiating_event": {"source": "x"}}, 400, "bad_request",
     "source and id"),
    ({"action_class": "enrichment", "initiating_event": "x"}, 400, "bad_request",
     "initiating_event"),
    ({"action_class": "enrichment", "colour": "red"}, 400, "bad_request", "unknown field"),
    ({"target": "x"}, 400, "bad_request", "action_class is required"),
    ([], 400, "bad_request", "JSON object"),
])
def test_bad_requests_get_clear_error_bodies(sidecars: dict[str, Sidecar], body: object,
                                             status: int, code: str, words: str) -> None:
    got, payload = sidecars["triage"].client.raw("POST", "/v1/credentials", body)  # type: ignore[arg-type]
    assert got == status
    assert payload["error"]["code"] == code  # type: ignore[index]
    assert words in payload["error"]["message"]  # type: ignore[index]


def test_denial_body_carries_the_decision(sidecars: dict[str, Sidecar]) -> None:
    status, payload = sidecars["triage"].client.raw(
        "POST", "/v1/credentials", {"action_class": "containment.isolate_host"})
    assert status == 403
    decision = payload["error"]["decision"]  # type: ignore[index]
    assert decision["outcome"] == "deny"
    assert decision["owner"]["team"] == "incident-response"
    assert decision["escalation"] == ["ir-oncall", "incident-commander"]


def test_malformed_json_and_unknown_endpoints(sidecars: dict[str, Sidecar]) -> None:
    sock = sidecars["triage"].client.socket_path
    status, payload = _raw(sock, b"POST /v1/credentials HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: 5\r\nConnection: close\r\n\r\n{nope")
    assert status == 400 and "not valid JSON" in payload["error"]["message"]  # type: ignore[index]
    status, payload = sidecars["triage"].client.raw("GET", "/v1/secrets")
    assert status == 404 and payload["error"]["code"] == "not_found"  # type: ignore[index]
    status, payload = sidecars["triage"].client.raw("DELETE", "/v1/credentials/")
    assert status == 404


def test_healthz(sidecars: dict[str, Sidecar]) -> None:
    assert sidecars["triage"].client.health()["spiffe_id"] == TRIAGE


def test_broker_down_is_503(identity: Identity, short_tmp: Path) -> None:
    sc = start_sidecar(identity, "triage", f"127.0.0.1:{free_port()}", short_tmp / "sc-down.sock",
                       broker_timeout=3.0)
    try:
        status, payload = sc.client.raw("POST", "/v1/credentials", {"action_class": "enrichment"})
        assert status == 503
        assert payload["error"]["code"] == "broker_unavailable"  # type: ignore[index]
        assert "unreachable" in payload["error"]["message"]  # type: ignore[index]
    finally:
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()


def test_sidecar_with_identity_from_another_ca_gets_401(broker: BrokerServer, short_tmp: Path
                                                        ) -> None:
    rogue_ca = DevCA("example.org", now=datetime.now(UTC))
    api = DevWorkloadApi(rogue_ca)
    api.add_workload(TRIAGE, str(short_tmp / "wl-rogue" / "triage.sock"))
    api.start()
    rogue = Identity(ca=rogue_ca, api=api, dir=short_tmp / "wl-rogue")
    sc = start_sidecar(rogue, "triage", f"127.0.0.1:{broker.port}", short_tmp / "sc-rogue.sock",
                       broker_timeout=5.0)
    try:
        status, payload = sc.client.raw("POST", "/v1/credentials", {"action_class": "enrichment"})
        assert status == 401, payload
        assert payload["error"]["code"] == "unauthenticated"  # type: ignore[index]
    finally:
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()
        api.stop()


def test_vault_down_is_503_naming_vault(identity: Identity, short_tmp: Path) -> None:
    from tests.integration.conftest import broker_config

    own = OpenBaoDev(short_tmp)
    own.start()
    server = BrokerServer(broker_config(own, identity))
    server.start()
    sc = start_sidecar(identity, "triage", f"127.0.0.1:{server.port}",
                       short_tmp / "sc-novault.sock")
    try:
        own.stop()
        status, payload = sc.client.raw("POST", "/v1/credentials", {"action_class": "enrichment"})
        assert status == 503
        assert payload["error"]["code"] == "vault_unavailable"  # type: ignore[index]
        assert "Vault" in payload["error"]["message"]  # type: ignore[index]
        assert len(sc.service.cache) == 0
    finally:
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()
        server.stop(grace=0)


def test_sidecar_logs_no_token(sidecars: dict[str, Sidecar],
                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body = sidecars["triage"].client.request_credential("enrichment", target="t-logs")
    sidecars["triage"].client.hand_back(body["credential_id"])
    assert body["credential_id"] in caplog.text
    assert body["token"] not in caplog.text


def test_a_spent_budget_is_429_with_retry_after(identity: Identity, bao: OpenBaoDev,
                                                short_tmp: Path) -> None:
    """identity.disable_account allows 2/h: the third is 429, free again in about an hour."""
    import http.client

    from tests.integration.conftest import broker_config

    server = BrokerServer(broker_config(bao, identity))  # its own, unspent budgets
    server.start()
    sock = short_tmp / "sc-budget.sock"
    sc = start_sidecar(identity, "containment", f"127.0.0.1:{server.port}", sock)

    def ask(target: str) -> tuple[int, dict[str, str], dict[str, object]]:
        conn = http.client.HTTPConnection("sidecar", timeout=30)
        conn.sock = socket.socket(socket.AF_UNIX)
        conn.sock.connect(str(sock))
        try:
            conn.request("POST", "/v1/credentials", body=json.dumps({
                "action_class": "identity.disable_account", "target": target,
                "initiating_event": ALERT, "justification": "disable the phished account"}))
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), json.loads(resp.read())
        finally:
            conn.close()

    try:
        assert ask("user-a")[0] == 200
        assert ask("user-b")[0] == 200
        status, headers, body = ask("user-c")
        assert status == 429, body
        error = body["error"]
        assert isinstance(error, dict) and error["code"] == "budget_exhausted"
        assert "budget of 2/h" in error["message"]
        assert 3500 <= int(headers["Retry-After"]) <= 3601, headers
        assert error["retry_after_seconds"] == int(headers["Retry-After"])
        assert error["decision"]["rule"] == "identity.disable_account.limits.per_workload"
    finally:
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()
        server.stop(grace=0)
