"""A broker SIGKILLed with issuances in flight always starts again, and leaves nothing behind.

The broker runs as a real process (``python -m broker.cli.main serve``); OpenBao is one TCP
hop away behind the fault proxy, which holds Vault's answers so that the kill lands
between "Vault minted" and "the broker recorded it".
"""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import hvac

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker._proto.credbroker.v1 import broker_pb2_grpc as pb_grpc
from credbroker_dev.devstack import OpenBaoDev
from tests.faults.support import (
    BrokerFiles,
    BrokerProcess,
    VaultView,
    registry_instance,
    registry_rows,
    verdict,
)
from tests.integration.conftest import CONTAINMENT, TRIAGE, Identity, broker_config
from tests.integration.helpers import EVENT, TcpProxy, issue_request, stub, svid

IN_FLIGHT = 20
ROUNDS = 3


def _request(i: int) -> pb.IssueCredentialRequest:
    if i % 2:
        return issue_request("containment.isolate_host", target=f"host-{i}",
                             initiating_event=EVENT, request_id=uuid.uuid4().hex)
    return issue_request(request_id=uuid.uuid4().hex)


def _mine(view: VaultView, instance: str, before: set[str]) -> set[str]:
    return {a for a, m in view.live_credbroker().items()
            if a not in before and m.get("broker_instance") == instance}


def test_sigkill_with_issuances_in_flight_then_restart(
    bao: OpenBaoDev, identity: Identity, vault_root: hvac.Client, proxy: TcpProxy,
    view: VaultView, tracked: list[BrokerFiles]
) -> None:
    cfg = broker_config(bao, identity, vault_addr=proxy.addr)
    files = BrokerFiles.of(cfg)
    tracked.append(files)
    proc = BrokerProcess(cfg, vault_token=bao.root_token,
                         log=cfg.audit_path.parent / "broker.log")
    port = proc.start()
    instance = registry_instance(cfg.registry_path)
    handed: list[str] = []
    killed_with: list[int] = []
    try:
        for _ in range(ROUNDS):
            agents = {who: stub(port, identity.ca, svid(identity.ca, who))
                      for who in (TRIAGE, CONTAINMENT)}
            handed.append(agents[TRIAGE].IssueCredential(
                issue_request(request_id=uuid.uuid4().hex), timeout=15).credential.credential_id)
            # Each identity's first mint of a class writes its token role (one more Vault
            # call): done before the answers are held, so each held request is one mint.
            handed.append(agents[CONTAINMENT].IssueCredential(
                _request(1), timeout=15).credential.credential_id)
            before = set(view.live_credbroker())
            proxy.hold()  # Vault mints; the broker does not hear back
            outcomes: list[grpc.StatusCode] = []

            def call(i: int, agents: dict[str, pb_grpc.CredentialBrokerStub] = agents,
                     outcomes: list[grpc.StatusCode] = outcomes) -> None:
                who = CONTAINMENT if i % 2 else TRIAGE
                try:
                    resp = agents[who].IssueCredential(_request(i), timeout=60)
                    handed.append(resp.credential.credential_id)  # (never, with answers held)
                    outcomes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    outcomes.append(exc.code())

            callers = [threading.Thread(target=call, args=(i,), daemon=True)
                       for i in range(IN_FLIGHT)]
            for t in callers:
                t.start()
            # Kill once most of them reached Vault (and Vault minted), none answered yet.
            deadline = time.monotonic() + 15
            while len(_mine(view, instance, before)) < IN_FLIGHT * 3 // 4:
                assert time.monotonic() < deadline, "OpenBao never minted the held requests"
                time.sleep(0.05)
            proc.kill()
            killed_with.append(len(_mine(view, instance, before)))
            proxy.cut()  # whatever the dead broker had sent is either at Vault or gone
            proxy.release()
            _wait_quiet(view, instance, before)
            proxy.restore()
            for t in callers:
                t.join(30)
            assert len(outcomes) == IN_FLIGHT
            assert grpc.StatusCode.OK not in outcomes
            assert _mine(view, instance, before), "the kill left no orphan: nothing was tested"

            port = proc.start()  # the restart succeeds, every time
            # Start-up recovery ran before the broker served: nothing is left to chance.
            v = verdict(view, tracked, handed)
            assert v.ok, str(v)
            assert not _mine(view, instance, before), "orphans of the killed broker are live"
            unresolved = [r["request_id"] for r in registry_rows(cfg.registry_path)
                          if r["state"] in ("intent", "ambiguous")]
            assert unresolved == []
        # The broker that survived all this still issues.
        handed.append(stub(port, identity.ca, svid(identity.ca, TRIAGE)).IssueCredential(
            issue_request(request_id=uuid.uuid4().hex), timeout=15).credential.credential_id)
        v = verdict(view, tracked, handed)
        assert v.ok, str(v)
    finally:
        proxy.release()
        proc.stop()
    assert min(killed_with) >= IN_FLIGHT * 3 // 4


def _wait_quiet(view: VaultView, instance: str, before: set[str]) -> None:
    """Until Vault has finished with whatever the killed broker sent (no new token in 1 s)."""
    last, since = _mine(view, instance, before), time.monotonic()
    while time.monotonic() - since < 1.0:
        time.sleep(0.2)
        now = _mine(view, instance, before)
        if now != last:
            last, since = now, time.monotonic()
