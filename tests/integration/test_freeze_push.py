"""The freeze push a workload's revocation stream receives says what was frozen, why and by
whom: the sidecar logs it, and it is the only word a workload gets before its calls fail.
(mutmut: a freeze push without its reason survived the suite.)"""

from __future__ import annotations

import grpc

from broker._proto.credbroker.v1 import broker_pb2 as pb
from tests.integration.conftest import ADMIN, TRIAGE, Identity
from tests.integration.helpers import admin_stub, stub, svid
from tests.integration.test_revocation import Factory, make_broker

__all__ = ["make_broker"]  # the fixture, shared with test_revocation


def test_a_class_freeze_push_names_the_class_the_reason_and_the_person(
        make_broker: Factory, identity: Identity) -> None:
    server = make_broker()
    stream = stub(server.port, identity.ca, svid(identity.ca, TRIAGE)).WatchRevocations(
        pb.WatchRevocationsRequest(), timeout=30)
    admin = admin_stub(server.port, identity.ca, svid(identity.ca, ADMIN))
    try:
        assert next(stream).HasField("sync")
        admin.Freeze(pb.FreezeRequest(action_class="enrichment", reason="bad TI feed"),
                     timeout=30)
        event = next(e for e in stream if e.HasField("frozen"))
        assert event.frozen.action_class == "enrichment" and not event.frozen.identity
        assert event.frozen.reason == "bad TI feed"
        assert event.frozen.by
    finally:
        stream.cancel()
        try:
            admin.Unfreeze(pb.UnfreezeRequest(action_class="enrichment", reason="test over"),
                           timeout=30)
        except grpc.RpcError:
            pass
