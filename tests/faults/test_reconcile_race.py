"""The reconcile scan against issuances that complete while it runs."""

from __future__ import annotations

import uuid

from broker._proto.credbroker.v1 import broker_pb2 as pb
from tests.faults.conftest import Factory
from tests.faults.support import BrokerFiles, VaultView, audit_records, settle
from tests.integration.conftest import TRIAGE, Identity
from tests.integration.helpers import issue_request, stub, svid


def test_an_issuance_completing_during_a_scan_is_not_taken_for_an_orphan(
    make_broker: Factory, view: VaultView, identity: Identity, tracked: list[BrokerFiles]
) -> None:
    """The scan reads the registry, then lists Vault: a credential issued in between (its
    intent recorded after the registry read, its token in Vault before the listing) is
    the agent's, not an orphan, and must not be revoked under it."""
    server = make_broker()
    assert server.store is not None and server.responder is not None
    store = server.store
    agent = stub(server.port, identity.ca, svid(identity.ca, TRIAGE))
    issued: list[pb.Credential] = []
    original = store.known_credential_ids

    def known_then_an_issuance_completes() -> set[str]:
        known = original()
        if not issued:  # once: an agent's issuance lands between this read and the listing
            issued.append(agent.IssueCredential(issue_request(request_id=uuid.uuid4().hex),
                                                timeout=15).credential)
        return known

    store.known_credential_ids = known_then_an_issuance_completes  # type: ignore[method-assign]
    report = server.responder.reconcile(full=True)
    store.known_credential_ids = original  # type: ignore[method-assign]
    (cred,) = issued
    assert report.revoked == 0, "the scan revoked a credential an agent had just received"
    assert view.alive(cred.credential_id), "the agent's fresh credential was revoked"
    row = store.get(cred.credential_id)
    assert row is not None and row.state == "live"
    assert server.config.audit_path is not None
    assert not [r for r in audit_records(server.config.audit_path)
                if r["type"] == "credential.revoked"
                and r.get("credential_id") == cred.credential_id]
    v = settle(view, tracked, [cred.credential_id])
    assert v.ok, str(v)
