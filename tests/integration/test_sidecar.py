"""The sidecar's HTTP/JSON API on a unix socket, against the real broker and OpenBao."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.adapters.audit import read_records
from broker.cli.main import main as cli_main
from broker.grpc.server import BrokerServer
from credbroker_dev.devspiffe import DevCA, DevWorkloadApi
from credbroker_dev.devstack import OpenBaoDev, free_port
from sidecar.broker_client import BrokerCallError
from sidecar.client import SidecarError
from tests.integration.conftest import (
    TEST_MAP,
    TRIAGE,
    Identity,
    Sidecar,
    start_sidecar,
    vault_as,
)

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
    again = c.request_credential("enrichment", target="t-cache", initiating_event=ALERT,
                                 justification="enrich")
    assert again["cached"] is True and again["credential_id"] == body["credential_id"]
    assert again["minted_request_id"] == body["request_id"] != again["request_id"]
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


# --- every request an agent makes is on the record (issue #11 item 2) ----------------------


@dataclass
class Recorded:
    server: BrokerServer
    map_path: Path
    triage: Sidecar
    containment: Sidecar

    def records(self, kind: str) -> list[dict[str, Any]]:
        """The audit file's records of ``kind``, read from disk."""
        assert self.server.audit is not None
        return [r for r in read_records(self.server.audit.path) if r["type"] == kind]

    def decision_of(self, request_id: str) -> dict[str, Any]:
        found = [r for r in self.records("decision") if r["request_id"] == request_id]
        assert len(found) == 1, f"{len(found)} decision records for request {request_id}"
        return found[0]


@pytest.fixture(scope="module")
def recorded(bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client, short_tmp: Path
             ) -> Iterator[Recorded]:
    """A broker of its own (its scope map is a copy these tests may change) and two sidecars."""
    from tests.integration.conftest import broker_config

    path = short_tmp / "record-map.yaml"
    shutil.copy(TEST_MAP, path)
    server = BrokerServer(broker_config(bao, identity, scope_map_path=path))
    server.start()
    addr = f"127.0.0.1:{server.port}"
    scs = [start_sidecar(identity, name, addr, short_tmp / f"sc-rec-{name}.sock")
           for name in ("triage", "containment")]
    for sc in scs:
        assert sc.service.synced.wait(5)
    yield Recorded(server=server, map_path=path, triage=scs[0], containment=scs[1])
    for sc in scs:
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()
    server.stop(grace=1)


def _until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_another_initiating_event_gets_its_own_decision(recorded: Recorded) -> None:
    c = recorded.triage.client
    first = c.request_credential("enrichment", target="t-ev", initiating_event=ALERT,
                                 justification="enrich")
    other = {"source": "splunk", "id": "NOTABLE-8", "summary": "beaconing"}
    second = c.request_credential("enrichment", target="t-ev", initiating_event=other,
                                  justification="enrich")
    assert second["cached"] is False and second["credential_id"] != first["credential_id"]
    assert recorded.decision_of(second["request_id"])["request"]["initiating_event"] == other
    assert recorded.decision_of(first["request_id"])["request"]["initiating_event"] == ALERT
    # Another justification alone is another request too.
    third = c.request_credential("enrichment", target="t-ev", initiating_event=ALERT,
                                 justification="enrich again")
    assert third["cached"] is False
    assert recorded.decision_of(third["request_id"])["request"]["justification"] == \
        "enrich again"


def test_a_longer_ttl_is_not_answered_from_the_cache(recorded: Recorded) -> None:
    c = recorded.triage.client
    first = c.request_credential("enrichment", target="t-ttl", initiating_event=ALERT)
    assert first["ttl_seconds"] == 120
    with pytest.raises(SidecarError) as err:  # the class allows at most 5 minutes
        c.request_credential("enrichment", target="t-ttl", initiating_event=ALERT,
                             ttl_seconds=3600)
    assert err.value.status == 400 and err.value.code == "ttl_above_max"
    denied = [r for r in recorded.records("decision")
              if r["request"]["target"] == "t-ttl" and r["request"]["ttl_seconds"] == 3600]
    assert [r["decision"]["outcome"] for r in denied] == ["deny"]
    # A TTL the class allows gets a credential of that TTL, not the cached one.
    longer = c.request_credential("enrichment", target="t-ttl", initiating_event=ALERT,
                                  ttl_seconds=240)
    assert longer["cached"] is False and longer["ttl_seconds"] == 240


def test_a_request_the_when_condition_denies_is_denied_though_the_class_is_cached(
        recorded: Recorded) -> None:
    c = recorded.containment.client
    ok = c.request_credential("identity.disable_account", target="user-7",
                              initiating_event=ALERT, justification="account beaconing to C2")
    assert ok["cached"] is False
    with pytest.raises(SidecarError) as err:  # when: justification of 10 characters or more
        c.request_credential("identity.disable_account", target="user-7",
                             initiating_event=ALERT, justification="short")
    assert err.value.status == 403 and err.value.code == "condition_false"
    assert err.value.body["error"]["decision"]["outcome"] == "deny"
    refused = [r for r in recorded.records("decision")
               if r["request"]["action_class"] == "identity.disable_account"
               and r["request"]["justification"] == "short"]
    assert [r["decision"]["deny_code"] for r in refused] == ["condition_false"]


def test_an_identical_request_is_cached_and_on_the_record(
        recorded: Recorded, capsys: pytest.CaptureFixture[str]) -> None:
    c = recorded.triage.client
    first = c.request_credential("enrichment", target="t-same", initiating_event=ALERT,
                                 justification="enrich")
    again = c.request_credential("enrichment", target="t-same", initiating_event=ALERT,
                                 justification="enrich")
    assert again["cached"] is True and again["credential_id"] == first["credential_id"]
    assert again["request_id"] != first["request_id"]

    def reused() -> list[dict[str, Any]]:
        return [r for r in recorded.records("credential.reused")
                if r["request_id"] == again["request_id"]]

    _until(lambda: bool(reused()), "no credential.reused record within 5 s")
    (record,) = reused()
    assert record["credential_id"] == first["credential_id"]
    assert record["minted_request_id"] == first["request_id"]
    assert record["spiffe_id"] == TRIAGE
    assert record["request"] == {"action_class": "enrichment", "target": "t-same",
                                 "initiating_event": ALERT, "justification": "enrich",
                                 "ttl_seconds": 0}
    assert record["served_at"].endswith("Z") and record["proof"]["x509_serial"]
    assert first["token"] not in json.dumps(record)
    # the record is durable before the broker's answer reaches the sidecar's reporter
    _until(lambda: recorded.triage.service.reporter.pending == 0,
           "the sidecar still counts the hit as unreported")
    # `credbroker audit trace` lists both requests the credential served.
    assert recorded.server.audit is not None
    log = str(recorded.server.audit.path)
    assert cli_main(["audit", "trace", first["credential_id"], "--log", log]) == 0
    text = capsys.readouterr().out
    assert "served 2 requests:" in text
    assert f"minted for request {first['request_id']}" in text
    assert f"reused from the sidecar cache for request {again['request_id']}; event: splunk " \
           "NOTABLE-7 — beaconing; justification: enrich" in text
    assert cli_main(["audit", "trace", again["request_id"], "--log", log, "--json"]) == 0
    served = json.loads(capsys.readouterr().out)["served"]
    assert [(s["how"], s["request_id"]) for s in served] == [
        ("minted", first["request_id"]), ("reused", again["request_id"])]


def test_a_hit_for_another_workloads_credential_is_not_recorded(recorded: Recorded) -> None:
    theirs = recorded.containment.client.request_credential("enrichment", target="t-theirs")
    hit = pb.CacheHit(credential_id=theirs["credential_id"], request_id="forged-1",
                      request=pb.IssueCredentialRequest(action_class="enrichment",
                                                        target="t-theirs"))
    client = recorded.triage.service.client
    resp = client.loop.run(client.report_cache_hits([hit]))
    assert resp.recorded == 0 and [r.index for r in resp.rejected] == [0]
    assert not [r for r in recorded.records("credential.reused")
                if r["request_id"] == "forged-1"]


def test_a_scope_map_reload_drops_the_sidecar_cache(recorded: Recorded) -> None:
    c, service = recorded.triage.client, recorded.triage.service
    first = c.request_credential("enrichment", target="t-reload", initiating_event=ALERT)
    assert c.request_credential("enrichment", target="t-reload",
                                initiating_event=ALERT)["cached"] is True
    old = first["decision"]["scope_map_version"]
    recorded.map_path.write_text(recorded.map_path.read_text().replace(
        "escalation: [soc-oncall]", "escalation: [soc-oncall, soc-lead]"))
    assert recorded.server.reload() is True
    _until(lambda: not service.cache.holds(first["credential_id"]),
           "the sidecar kept its cache after a new scope map was put in force")
    fresh = c.request_credential("enrichment", target="t-reload", initiating_event=ALERT)
    assert fresh["cached"] is False and fresh["credential_id"] != first["credential_id"]
    assert fresh["decision"]["scope_map_version"] != old
    assert fresh["decision"]["escalation"] == ["soc-oncall", "soc-lead"]
    assert c.request_credential("enrichment", target="t-reload",
                                initiating_event=ALERT)["cached"] is True


def test_a_resent_batch_is_recorded_once_and_batches_are_bounded(recorded: Recorded) -> None:
    mine = recorded.triage.client.request_credential("enrichment", target="t-resend")
    hit = pb.CacheHit(credential_id=mine["credential_id"], request_id="resent-1",
                      request=pb.IssueCredentialRequest(action_class="enrichment",
                                                        target="t-resend"))
    client = recorded.triage.service.client
    assert client.loop.run(client.report_cache_hits([hit])).recorded == 1
    # its answer was lost: the sidecar sends it again
    again = client.loop.run(client.report_cache_hits([hit]))
    assert (again.recorded, again.duplicates) == (0, 1)
    assert len([r for r in recorded.records("credential.reused")
                if r["request_id"] == "resent-1"]) == 1
    with pytest.raises(BrokerCallError) as err:
        client.loop.run(client.report_cache_hits([hit] * 101))
    assert err.value.http_status == 400 and "at most 100" in err.value.message


def test_cache_hits_outside_a_credentials_life_are_refused(recorded: Recorded) -> None:
    """A workload cannot fill the audit log with reuses of a credential it once held."""
    from datetime import timedelta

    from google.protobuf.timestamp_pb2 import Timestamp

    mine = recorded.triage.client.request_credential("enrichment", target="t-life")
    req = pb.IssueCredentialRequest(action_class="enrichment", target="t-life")
    client = recorded.triage.service.client
    after = Timestamp()
    after.FromDatetime(datetime.now(UTC) + timedelta(hours=2))  # past expiry (and the future)
    resp = client.loop.run(client.report_cache_hits([pb.CacheHit(
        credential_id=mine["credential_id"], request_id="late-1", request=req,
        served_at=after)]))
    assert resp.recorded == 0 and "outside the life" in resp.rejected[0].reason
    recorded.triage.client.hand_back(mine["credential_id"])  # revoked, but in its life: fine
    now = Timestamp()
    now.FromDatetime(datetime.now(UTC))
    assert client.loop.run(client.report_cache_hits([pb.CacheHit(
        credential_id=mine["credential_id"], request_id="in-life-1", request=req,
        served_at=now)])).recorded == 1
    assert not [r for r in recorded.records("credential.reused")
                if r["request_id"] == "late-1"]


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


# --- the sidecar's client to the broker is grpc.aio (issue #12) ------------------------------


def test_32_concurrent_misses_are_awaits_on_one_loop_not_a_thread_each(
        identity: Identity, broker: BrokerServer, vault_root: hvac.Client,
        short_tmp: Path) -> None:
    """32 agents ask one sidecar at once, each for a new target: every one gets its own live
    token, and the sidecar started no thread to serve them (the broker's own pool, in this
    process too, is told apart by its thread names)."""
    import threading

    sc = start_sidecar(identity, "triage", f"127.0.0.1:{broker.port}", short_tmp / "sc-32.sock")
    try:
        # the loop, the channel and the JWT-SVID are up
        sc.client.hand_back(sc.client.request_credential("enrichment", target="t-32")[
            "credential_id"])
        before = {t.ident for t in threading.enumerate()}
        go = threading.Barrier(32)
        bodies: list[dict[str, Any]] = []

        def agent(n: int) -> None:
            go.wait()
            bodies.append(sc.client.request_credential("enrichment", target=f"t-32-{n}"))

        agents = [threading.Thread(target=agent, args=(n,), name=f"agent-{n}")
                  for n in range(32)]
        for t in agents:
            t.start()
        for t in agents:
            t.join(60)
        new = sorted(t.name for t in threading.enumerate() if t.ident not in before
                     and not t.name.startswith(("agent-", "broker")))
        assert len(bodies) == 32 and len({b["credential_id"] for b in bodies}) == 32
        assert not any(b["cached"] for b in bodies)
        assert new == [], f"threads the sidecar started to serve: {new}"
        for b in bodies:  # OpenBao says each token is alive, for the triage identity
            meta = vault_root.auth.token.lookup_accessor(b["credential_id"])["data"]["meta"]
            assert meta["spiffe_id"] == TRIAGE
    finally:
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()


def test_after_the_svid_rotates_the_sidecar_calls_with_the_new_one(
        recorded: Recorded, identity: Identity, vault_root: hvac.Client) -> None:
    """The channel is rebuilt for the rotated SVID: the broker's audit record of a later
    request names the new certificate, and that request's token works."""
    from broker.core.spiffeid import SpiffeId

    c = recorded.triage.client
    first = c.request_credential("enrichment", target="t-rot-0")
    old = recorded.decision_of(first["request_id"])["proof"]["x509_serial"]
    identity.api.rotate_now(SpiffeId.parse(TRIAGE))
    later: dict[str, Any] = {}

    def new_serial() -> bool:
        later.update(c.request_credential("enrichment", target=f"t-rot-{time.monotonic()}"))
        return bool(recorded.decision_of(later["request_id"])["proof"]["x509_serial"] != old)

    _until(new_serial, "the sidecar still calls with the SVID from before the rotation")
    meta = vault_root.auth.token.lookup_accessor(later["credential_id"])["data"]["meta"]
    assert meta["spiffe_id"] == TRIAGE


def test_the_revocation_stream_comes_back_when_its_channel_is_retired(
        identity: Identity, broker: BrokerServer, short_tmp: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After an SVID rotation the next call builds a new channel; the old one, with the
    revocation stream on it, is closed once its grace is over. The stream reconnects (a new
    sync) instead of ending with it."""
    from broker.core.spiffeid import SpiffeId
    from broker.wire import tls

    monkeypatch.setattr(tls, "OLD_CHANNEL_GRACE_SECONDS", 0.2)
    sc = start_sidecar(identity, "triage", f"127.0.0.1:{broker.port}", short_tmp / "sc-ret.sock")
    try:
        assert sc.service.synced.wait(5)
        first = sc.client.request_credential("enrichment", target="t-ret-0")
        sc.service.synced.clear()
        identity.api.rotate_now(SpiffeId.parse(TRIAGE))
        _until(lambda: sc.client.request_credential(
            "enrichment", target=f"t-ret-{time.monotonic()}")["credential_id"] != "" and
            sc.service.synced.is_set(), "the revocation stream did not come back", 10.0)
        # and it carries revocations again: a hand-back empties the cache entry it named
        sc.client.hand_back(first["credential_id"])
        assert not sc.service.cache.holds(first["credential_id"])
    finally:
        sc.http.close()
        sc.service.stop_watching()
        sc.service.client.close()
