"""The issuance use case through its ports: what each failing step leaves behind.

The store and the audit log are the real ones (SQLite, the log file); Vault is a scripted
token table behind the Vault port (the real adapter is exercised by the integration and
fault suites). A failing step is the real object with that one method failing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.adapters.approvers import ApproverConfig
from broker.adapters.audit import AuditLog, read_records
from broker.adapters.environments import Environments
from broker.adapters.registry import SqliteStore, StoreError
from broker.app.approval_desk import ApprovalDesk
from broker.app.budget import StoreBudget
from broker.app.issuance import DeniedByPolicy, Issued, Issuer, PendingApproval
from broker.app.responder import Responder, RevocationBus
from broker.core.approvals import Approver
from broker.core.models import Caller, CredentialRequest, InitiatingEvent, MintedToken
from broker.core.scopemap import ActionClass, ScopeMap, parse_scope_map
from broker.core.spiffeid import SpiffeId
from broker.errors import (
    AuditError,
    FrozenError,
    VaultPermissionError,
    VaultUnavailableError,
)
from broker.grpc.observability import Metrics

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
MAP = Path(__file__).parents[2] / "data" / "test-scope-map.yaml"
TRIAGE = SpiffeId.parse("spiffe://example.org/agent/triage")
CONTAINMENT = SpiffeId.parse("spiffe://example.org/agent/containment")
LEAD = Approver(subject="lead@example.org", groups=("ir-leads",), via="oidc")
EVENT = InitiatingEvent(source="siem", id="42")


class ScriptedVault:
    """The Vault port over a table of live tokens; ``fail_mint`` / ``fail_revoke`` make
    the next call fail, ``on_mint`` runs after a token exists (a race). ``mints`` and
    ``revokes`` are what Vault was asked (the arguments), in order."""

    def __init__(self) -> None:
        self.live: dict[str, str] = {}  # accessor -> class
        self.fail_mint: Exception | None = None
        self.fail_revoke: Exception | None = None
        self.on_mint: Callable[[], None] | None = None
        self.mints: list[dict[str, Any]] = []
        self.revokes: list[tuple[str, bool]] = []
        self._n = 0

    def mint(self, *, cls: ActionClass, spiffe_id: SpiffeId, ttl_seconds: int,
             metadata: Mapping[str, str], now: datetime) -> MintedToken:
        self.mints.append({"cls": cls.name, "spiffe_id": spiffe_id, "ttl_seconds": ttl_seconds,
                           "metadata": dict(metadata), "now": now})
        if self.fail_mint is not None:
            raise self.fail_mint
        self._n += 1
        accessor = f"acc-{self._n}"
        self.live[accessor] = cls.name
        if self.on_mint is not None:
            self.on_mint()
        return MintedToken(token=f"tok-{self._n}", accessor=accessor,
                           policies=(f"credbroker-{cls.name}",), ttl_seconds=ttl_seconds,
                           expires_at=now + timedelta(seconds=ttl_seconds), entity_id="e-1",
                           lease_prefix=f"auth/token/create/credbroker-{cls.name}/")

    def revoke_accessor(self, accessor: str, *, check: bool = True) -> bool:
        self.revokes.append((accessor, check))
        if self.fail_revoke is not None:
            raise self.fail_revoke
        return self.live.pop(accessor, None) is not None

    # What the responder's freeze asks of Vault.
    def __getattr__(self, name: str) -> Callable[..., Any]:
        def anything(*args: object, **kwargs: object) -> Any:
            return None
        return anything


class FailingStore(SqliteStore):
    fail: str = ""

    def record_minted(self, **kwargs: Any) -> None:
        if self.fail == "record_minted":
            raise StoreError("the registry could not be written (test)")
        super().record_minted(**kwargs)

    def mark_revoked(self, credential_id: str, **kwargs: Any) -> None:
        if self.fail == "mark_revoked":
            raise StoreError("the registry could not be written (test)")
        super().mark_revoked(credential_id, **kwargs)

    def add_freeze(self, freeze: Any, entity_ids: Any) -> None:
        if self.fail == "add_freeze":
            raise StoreError("the registry could not be written (test)")
        super().add_freeze(freeze, entity_ids)


class FailingAudit(AuditLog):
    fail: str = ""

    def append(self, event: str, **fields: Any) -> Any:
        if event == self.fail:
            raise AuditError("the audit log could not be written (test)")
        return super().append(event, **fields)


@dataclass
class Maps:
    current: ScopeMap
    vault_synced: bool = True


@dataclass
class World:
    issuer: Issuer
    vault: ScriptedVault
    store: FailingStore
    audit: FailingAudit
    audit_path: Path
    responder: Responder
    desk: ApprovalDesk

    def records(self, event: str) -> list[dict[str, Any]]:
        return [r for r in read_records(self.audit_path) if r["type"] == event]

    def budget_used(self, spiffe_id: SpiffeId, cls: str) -> int:
        with self.store.budget_hold(str(spiffe_id), cls, T0, timedelta(days=1)) as hold:
            return len(hold.recent)


@pytest.fixture
def w(tmp_path: Path) -> World:
    scope_map = parse_scope_map([(str(MAP), MAP.read_text())])
    store = FailingStore(tmp_path / "registry.db")
    audit_path = tmp_path / "audit.log"
    audit = FailingAudit(audit_path, clock=lambda: T0)
    vault = ScriptedVault()
    responder = Responder(store=store, vault=vault,  # type: ignore[arg-type]
                          audit=audit, bus=RevocationBus(), scope_map=lambda: scope_map,
                          clock=lambda: T0)
    desk = ApprovalDesk(store=store, audit=audit, config=ApproverConfig(), clock=lambda: T0)
    issuer = Issuer(scope_maps=Maps(scope_map), vaults=Environments.single(vault),  # type: ignore[arg-type]
                    store=store,
                    budget=StoreBudget(store), audit=audit, responder=responder, desk=desk,
                    clock=lambda: T0, metrics=Metrics())
    return World(issuer=issuer, vault=vault, store=store, audit=audit, audit_path=audit_path,
                 responder=responder, desk=desk)


def caller(sid: SpiffeId) -> Caller:
    return Caller(spiffe_id=sid, x509_serial="01")


def disable_request(target: str = "user-1") -> CredentialRequest:
    """identity.disable_account: budget 2/h, so the slot accounting shows."""
    return CredentialRequest(action_class="identity.disable_account", target=target,
                             initiating_event=EVENT, justification="account takeover in 42")


def test_an_issuance_is_recorded_audited_and_counted(w: World) -> None:
    out = w.issuer.issue(caller(CONTAINMENT), disable_request(), "r1")
    assert isinstance(out, Issued)
    assert w.vault.live == {out.credential.accessor: "identity.disable_account"}
    row = w.store.get(out.credential.accessor)
    assert row is not None and row.state == "live" and row.request_id == "r1"
    assert [r["request_id"] for r in w.records("decision")] == ["r1"]
    assert [r["credential_id"] for r in w.records("credential.minted")] == ["acc-1"]
    assert w.budget_used(CONTAINMENT, "identity.disable_account") == 1


def test_a_credential_the_registry_cannot_record_is_revoked_and_its_slot_given_back(
        w: World) -> None:
    w.store.fail = "record_minted"
    with pytest.raises(StoreError):
        w.issuer.issue(caller(CONTAINMENT), disable_request(), "r1")
    assert w.vault.live == {}  # minted, then revoked: the agent never got it
    # Its audit record was written while the registry failed: the log says minted, then
    # revoked because it could not be recorded.
    assert [(r["type"], r.get("selector")) for r in read_records(w.audit_path)
            if r.get("credential_id") == "acc-1"] == [("credential.minted", None),
                                                     ("credential.revoked", "unrecorded")]
    assert w.budget_used(CONTAINMENT, "identity.disable_account") == 0


def test_a_credential_the_audit_log_cannot_record_is_revoked(w: World) -> None:
    w.audit.fail = "credential.minted"
    with pytest.raises(AuditError):
        w.issuer.issue(caller(CONTAINMENT), disable_request(), "r1")
    assert w.vault.live == {}
    row = w.store.get("acc-1")
    assert row is not None and row.state == "revoked" and not row.revoke_pending
    assert w.budget_used(CONTAINMENT, "identity.disable_account") == 0


def test_when_vault_does_not_confirm_the_revocation_it_stays_pending(w: World) -> None:
    w.audit.fail = "credential.minted"
    w.vault.fail_revoke = VaultUnavailableError("Vault is unreachable (test)")
    with pytest.raises(AuditError):
        w.issuer.issue(caller(CONTAINMENT), disable_request(), "r1")
    row = w.store.get("acc-1")
    assert row is not None and row.revoke_pending  # the retry loop revokes it
    assert "acc-1" in w.vault.live


def test_nothing_is_minted_when_the_decision_cannot_be_recorded(w: World) -> None:
    w.audit.fail = "decision"
    with pytest.raises(AuditError):
        w.issuer.issue(caller(CONTAINMENT), disable_request(), "r1")
    assert w.vault.live == {} and w.store.intents() == []
    assert w.budget_used(CONTAINMENT, "identity.disable_account") == 0


def test_a_refused_mint_forgets_its_intent_and_gives_the_slot_back(w: World) -> None:
    w.vault.fail_mint = VaultPermissionError("permission denied (test)")
    with pytest.raises(VaultPermissionError):
        w.issuer.issue(caller(CONTAINMENT), disable_request(), "r1")
    assert w.store.intents() == []
    assert w.budget_used(CONTAINMENT, "identity.disable_account") == 0


def test_a_lost_mint_answer_keeps_its_intent_for_reconcile(w: World) -> None:
    w.vault.fail_mint = VaultUnavailableError("answer lost (test)")
    with pytest.raises(VaultUnavailableError):
        w.issuer.issue(caller(CONTAINMENT), disable_request(), "r1")
    assert [(i.request_id, i.state) for i in w.store.intents()] == [("r1", "ambiguous")]


def test_a_freeze_made_while_minting_revokes_the_credential(w: World) -> None:
    def frozen_meanwhile() -> None:
        w.vault.on_mint = None
        w.responder.freeze(spiffe_id=str(CONTAINMENT), action_class="", reason="rogue",
                           by="alice@example.org")

    w.vault.on_mint = frozen_meanwhile
    with pytest.raises(FrozenError, match="revoked"):
        w.issuer.issue(caller(CONTAINMENT), disable_request(), "r1")
    assert w.vault.live == {}
    assert w.budget_used(CONTAINMENT, "identity.disable_account") == 0


def test_a_denial_counts_no_slot_and_mints_nothing(w: World) -> None:
    with pytest.raises(DeniedByPolicy) as denied:
        w.issuer.issue(caller(TRIAGE), disable_request(), "r1")  # triage is not listed
    assert denied.value.decision.deny_code is not None
    assert w.vault.live == {} and w.store.intents() == []
    assert [r["decision"]["outcome"] for r in w.records("decision")] == ["deny"]
    assert w.budget_used(TRIAGE, "identity.disable_account") == 0


def test_a_spent_budget_denies_the_next_request(w: World) -> None:
    for n in range(2):
        assert isinstance(w.issuer.issue(caller(CONTAINMENT), disable_request(), f"r{n}"),
                          Issued)
    with pytest.raises(DeniedByPolicy) as denied:
        w.issuer.issue(caller(CONTAINMENT), disable_request(), "r3")
    assert denied.value.decision.rule == "identity.disable_account.limits.per_workload"


def test_a_class_needing_approval_answers_pending_and_mints_only_once_approved(
        w: World) -> None:
    req = CredentialRequest(action_class="identity.revoke_tokens", target="user-1",
                            initiating_event=EVENT, justification="token theft in 42")
    pending = w.issuer.issue(caller(CONTAINMENT), req, "r1")
    assert isinstance(pending, PendingApproval) and w.vault.live == {}
    w.desk.decide(pending.approval.id, LEAD, "checked the ticket", approve=True)
    out = w.issuer.issue(caller(CONTAINMENT), req, "r1", approval_id=pending.approval.id)
    assert isinstance(out, Issued) and out.approval is not None
    assert w.desk.get(pending.approval.id).credential_id == out.credential.accessor
    with pytest.raises(Exception, match="used"):  # one approval, one credential
        w.issuer.issue(caller(CONTAINMENT), req, "r2", approval_id=pending.approval.id)
    assert list(w.vault.live) == [out.credential.accessor]


def test_a_class_without_a_budget_holds_nothing_in_the_store(w: World) -> None:
    req = CredentialRequest(action_class="enrichment", target="host-1", initiating_event=EVENT)
    assert isinstance(w.issuer.issue(caller(TRIAGE), req, "r1"), Issued)
    assert w.budget_used(TRIAGE, "enrichment") == 0


def test_nothing_is_minted_before_vault_holds_the_map(w: World) -> None:
    w.issuer._maps.vault_synced = False  # type: ignore[misc]
    with pytest.raises(VaultUnavailableError, match="not yet brought Vault"):
        w.issuer.issue(caller(CONTAINMENT), disable_request(), "r1")
    assert w.vault.live == {} and w.store.intents() == []
    assert w.budget_used(CONTAINMENT, "identity.disable_account") == 0


def test_an_issuance_under_way_while_the_broker_stops_still_records_its_credential(
        w: World) -> None:
    """The write pool is shut down (the broker stopping) while an issuance runs: its audit
    writes happen in its own thread instead of failing after the mint."""
    w.issuer.close()
    out = w.issuer.issue(caller(CONTAINMENT), disable_request(), "r1")
    assert isinstance(out, Issued)
    assert [r["credential_id"] for r in w.records("credential.minted")] == ["acc-1"]
    row = w.store.get("acc-1")
    assert row is not None and row.state == "live"
