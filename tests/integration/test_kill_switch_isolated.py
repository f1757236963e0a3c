"""Each kill-switch mechanism on its own, with the background revocation held back.

A freeze also revokes the tokens it covers, and a revocation alone makes Vault
refuse a token and a sidecar drop it. So these tests stall every
``revoke-accessor`` request between the broker and OpenBao (a real proxy fault):
whatever refuses a token or empties a cache here, it is not a revocation. The
revocation must still be in flight when each test asserts, and is checked to be.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import hvac
import hvac.exceptions
import pytest

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker.adapters.audit import read_records
from broker.grpc.server import BrokerServer
from credbroker_dev.devstack import OpenBaoDev
from tests.integration.conftest import (
    ADMIN,
    CONTAINMENT,
    TRIAGE,
    Identity,
    Sidecar,
    broker_config,
    start_sidecar,
    vault_as,
)
from tests.integration.helpers import EVENT, TcpProxy, admin_stub, issue_request, stub, svid

REVOKE = b"/revoke-"  # revoke-accessor and revoke-prefix: every revocation the broker sends


@dataclass
class Stalling:
    server: BrokerServer
    vault_link: TcpProxy  # the broker's only way to OpenBao

    def freeze(self, identity: Identity, **target: str) -> pb.FreezeResponse:
        resp: pb.FreezeResponse = admin_stub(
            self.server.port, identity.ca, svid(identity.ca, ADMIN)).Freeze(
            pb.FreezeRequest(reason="isolated kill switch", **target), timeout=30)
        return resp

    def live(self, spiffe_id: str) -> list[str]:
        """The credentials the broker's registry still holds as live (not revoked, not
        pending): what a sync lists, and proof that no revocation was announced."""
        assert self.server.store is not None
        return self.server.store.live_ids_of(spiffe_id, datetime.now(UTC))


@pytest.fixture
def stalling(bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client
             ) -> Iterator[Stalling]:
    link = TcpProxy(bao.port)
    server = BrokerServer(broker_config(bao, identity, vault_addr=link.addr))
    server.start()
    try:
        yield Stalling(server, link)
    finally:
        # OpenBao is shared by the session: give back every entity and policy frozen here.
        link.unstall()
        responder = server.responder
        assert responder is not None
        for f in list(responder.freezes):
            responder.unfreeze(spiffe_id=f.pattern if f.kind == "spiffe_id" else "",
                               action_class=f.pattern if f.kind == "action_class" else "",
                               reason="test over", by=ADMIN)
        if responder.last_freeze_revocation is not None:
            responder.last_freeze_revocation.join(15)
        server.stop(grace=0)
        link.cut()


def mint(server: BrokerServer, identity: Identity, who: str, target: str) -> pb.Credential:
    resp = stub(server.port, identity.ca, svid(identity.ca, who)).IssueCredential(
        issue_request("enrichment", target=target, initiating_event=EVENT), timeout=10)
    return resp.credential


def works(bao: OpenBaoDev, token: str) -> bool:
    """Whether OpenBao itself lets ``token`` read its class's secret."""
    try:
        vault_as(bao, token).secrets.kv.v2.read_secret_version(
            path="soc/enrichment/ti", raise_on_deleted_version=False)
        return True
    except hvac.exceptions.Forbidden:
        return False


def in_vault(vault_root: hvac.Client, accessor: str) -> bool:
    try:
        vault_root.auth.token.lookup_accessor(accessor)
        return True
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
        return False


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def close(sc: Sidecar) -> None:
    sc.http.close()
    sc.service.stop_watching()
    sc.service.client.close()


ASK = {"action_class": "enrichment", "target": "t"}


def test_identity_freeze_alone_makes_vault_refuse_the_tokens(
    stalling: Stalling, identity: Identity, bao: OpenBaoDev, vault_root: hvac.Client
) -> None:
    server, link = stalling.server, stalling.vault_link
    rogue = [mint(server, identity, CONTAINMENT, f"r{i}") for i in range(3)]
    bystander = mint(server, identity, TRIAGE, "b")
    assert all(works(bao, c.token) for c in [*rogue, bystander])
    link.stall(REVOKE)
    resp = stalling.freeze(identity, spiffe_id=CONTAINMENT)
    assert resp.credentials_matched == 3
    # One revoke-prefix call ends all three (one identity, one class): it is held.
    wait_until(lambda: link.stalled == 1, "the freeze's revocation never reached the proxy")
    # Asked of OpenBao, not of the broker: refused, though not one of them is revoked.
    assert [works(bao, c.token) for c in rogue] == [False] * 3
    assert all(in_vault(vault_root, c.credential_id) for c in rogue)
    assert works(bao, bystander.token)
    assert sorted(stalling.live(CONTAINMENT)) == sorted(c.credential_id for c in rogue)


@pytest.mark.parametrize("frozen", ["class", "identity"])
def test_frozen_push_alone_empties_the_sidecar_cache(
    frozen: str, stalling: Stalling, identity: Identity, short_tmp: Path
) -> None:
    server, link = stalling.server, stalling.vault_link
    sc = start_sidecar(identity, "triage", f"127.0.0.1:{server.port}",
                       short_tmp / f"sc-fp-{frozen}.sock")
    try:
        assert sc.service.synced.wait(5)
        first = sc.client.request_credential("enrichment", target="t")
        assert sc.client.request_credential("enrichment", target="t")["cached"] is True
        link.stall(REVOKE)
        stalling.freeze(identity, **({"action_class": "enrichment"} if frozen == "class"
                                     else {"spiffe_id": TRIAGE}))
        wait_until(lambda: link.stalled == 1, "the freeze's revocation never reached the proxy")
        answer: tuple[int, dict[str, Any]] = (0, {})
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            answer = sc.client.raw("POST", "/v1/credentials", ASK)
            if answer[0] != 200:
                break
            time.sleep(0.02)
        status, body = answer
        assert status == 409, f"still served ({'cached' if body.get('cached') else status}) " \
                              "a second after the freeze"
        assert body["error"]["code"] == "frozen"
        # No revocation reached the sidecar: the broker has not even finished one.
        assert first["credential_id"] in stalling.live(TRIAGE)
    finally:
        close(sc)


def test_sync_saying_frozen_alone_empties_the_sidecar_cache(
    stalling: Stalling, identity: Identity, short_tmp: Path
) -> None:
    server, link = stalling.server, stalling.vault_link
    stream = TcpProxy(server.port)  # the sidecar's only way to the broker
    sc = start_sidecar(identity, "triage", f"127.0.0.1:{stream.port}", short_tmp / "sc-sy.sock")
    try:
        assert sc.service.synced.wait(5)
        first = sc.client.request_credential("enrichment", target="t")
        assert sc.client.request_credential("enrichment", target="t")["cached"] is True
        link.stall(REVOKE)
        stream.cut()  # the sidecar hears nothing of what follows...
        sc.service.synced.clear()
        stalling.freeze(identity, spiffe_id=TRIAGE)
        wait_until(lambda: link.stalled == 1, "the freeze's revocation never reached the proxy")
        stream.restore()  # ...until it reconnects and is told where things stand
        assert sc.service.synced.wait(4), "the sidecar did not resynchronise"
        # The sync listed the credential as live (its revocation is still in flight):
        # only the sync's "frozen" can have dropped it.
        assert first["credential_id"] in stalling.live(TRIAGE)
        status, body = sc.client.raw("POST", "/v1/credentials", ASK)
        assert status == 409, f"still served ({'cached' if body.get('cached') else status}) " \
                              "after a sync saying frozen"
        assert body["error"]["code"] == "frozen"
        assert first["credential_id"] in stalling.live(TRIAGE)
    finally:
        close(sc)
        stream.cut()


def test_a_class_frozen_while_its_credential_is_minted_never_hands_it_out(
        stalling: Stalling, identity: Identity, vault_root: hvac.Client) -> None:
    """The decision was made before the freeze, the mint lands after it: the broker must
    see the freeze after recording the credential, revoke it and answer frozen."""
    link, server = stalling.vault_link, stalling.server
    link.stall(b"auth/token/create/credbroker-enrichment")  # the mint waits at the proxy
    result: dict[str, object] = {}

    def ask() -> None:
        try:
            result["cred"] = mint(server, identity, TRIAGE, "t-race")
        except grpc.RpcError as err:
            result["err"] = err

    t = threading.Thread(target=ask)
    t.start()
    wait_until(lambda: link.stalled == 1, "the mint never reached the proxy")
    assert server.responder is not None
    res = server.responder.freeze(spiffe_id="", action_class="enrichment",
                                  reason="race", by=ADMIN)
    assert not res.vault_pending
    link.unstall()
    t.join(15)
    err = result.get("err")
    assert isinstance(err, grpc.RpcError), result  # never a 200 for a frozen class
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(err.trailing_metadata() or ())["credbroker-error-code"] == "frozen"
    records = list(read_records(server.config.audit_path))
    minted = [r for r in records if r["type"] == "credential.minted"
              and r.get("target") == "t-race"]
    assert len(minted) == 1
    accessor = minted[0]["credential_id"]
    assert not in_vault(vault_root, accessor)  # OpenBao: the token is gone
    assert any(r["type"] == "credential.revoked" and r.get("credential_id") == accessor
               for r in records)
