"""Responder.reconcile against a scripted Vault (no servers): what it revokes, records,
audits, keeps and drops."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.adapters.audit import AuditLog, read_records
from broker.adapters.registry import SqliteStore
from broker.app.responder import STALE_INTENT, Responder, RevocationBus
from broker.core.scopemap import parse_scope_map
from broker.errors import VaultUnavailableError

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
TRIAGE = "spiffe://example.org/agent/triage"
MAP = Path(__file__).parents[2] / "data" / "test-scope-map.yaml"


class ScriptedVault:
    """The two calls reconcile makes, over a dict of live tokens: accessor -> metadata."""

    def __init__(self) -> None:
        self.tokens: dict[str, dict[str, str]] = {}
        self.revoked: list[str] = []
        self.down = False
        self.on_list: Callable[[], None] | None = None
        self.on_revoke: Callable[[], None] | None = None

    def managed_accessors(self, instance_id: str, *, skip: set[str] | frozenset[str] = frozenset(),
                          foreign: set[str] | None = None) -> dict[str, dict[str, str]]:
        if self.down:
            raise VaultUnavailableError("Vault is unreachable (scripted)")
        if self.on_list is not None:
            self.on_list()
        return {a: dict(m) for a, m in self.tokens.items()
                if a not in skip and m.get("broker_instance") == instance_id}

    def revoke_accessor(self, accessor: str, *, check: bool = True) -> bool:
        if self.down:
            raise VaultUnavailableError("Vault is unreachable (scripted)")
        if self.on_revoke is not None:
            self.on_revoke()
        self.revoked.append(accessor)
        return self.tokens.pop(accessor, None) is not None


class World:
    def __init__(self, tmp: Path) -> None:
        self.now = T0
        self.store = SqliteStore(tmp / "registry.db")
        self.audit_path = tmp / "audit.log"
        self.audit = AuditLog(self.audit_path, clock=lambda: self.now)
        self.vault = ScriptedVault()
        scope_map = parse_scope_map([(str(MAP), MAP.read_text())])
        self.responder = Responder(store=self.store, vault=self.vault,  # type: ignore[arg-type]
                                   audit=self.audit, bus=RevocationBus(),
                                   scope_map=lambda: scope_map, clock=lambda: self.now)

    def intent(self, rid: str) -> None:
        self.store.record_intent(request_id=rid, spiffe_id=TRIAGE, action_class="enrichment",
                                 target="t", event_source="", event_id="", at=self.now)

    def minted_in_vault(self, accessor: str, rid: str) -> None:
        self.vault.tokens[accessor] = {"credbroker": "1", "request_id": rid,
                                       "spiffe_id": TRIAGE, "action_class": "enrichment",
                                       "broker_instance": self.store.instance_id}

    def reconciled(self) -> set[str]:
        return {str(r["credential_id"]) for r in read_records(self.audit_path)
                if r["type"] == "credential.revoked" and r.get("selector") == "reconcile"}

    def state(self, rid: str) -> str | None:
        rows = [r for r in self.store.intents() if r.request_id == rid]
        return rows[0].state if rows else None


@pytest.fixture
def w(tmp_path: Path) -> World:
    return World(tmp_path)


def test_token_of_an_ambiguous_mint_is_revoked_recorded_and_audited(w: World) -> None:
    w.intent("lost")
    w.minted_in_vault("acc-lost", "lost")
    w.store.mark_ambiguous("lost")
    report = w.responder.reconcile()
    assert (report.revoked, report.error) == (1, "")
    assert w.vault.tokens == {}
    row = w.store.get("acc-lost")
    assert row is not None and row.state == "revoked" and row.request_id == "lost"
    assert w.store.intents() == []
    assert w.reconciled() == {"acc-lost"}


def test_an_issuance_in_flight_is_left_alone(w: World) -> None:
    w.intent("busy")
    w.minted_in_vault("acc-busy", "busy")  # minted, its answer on the way
    report = w.responder.reconcile(full=True)
    assert report.revoked == 0 and "acc-busy" in w.vault.tokens
    assert w.state("busy") == "intent"


def test_an_issuance_that_begins_during_the_scan_is_left_alone(w: World) -> None:
    """Its intent is recorded after the scan read the registry and its token is in Vault
    by the time Vault is listed."""
    w.intent("lost")
    w.store.mark_ambiguous("lost")

    def issuance_starts() -> None:
        w.intent("new")
        w.minted_in_vault("acc-new", "new")

    w.vault.on_list = issuance_starts
    report = w.responder.reconcile()
    assert report.revoked == 0 and "acc-new" in w.vault.tokens
    assert w.reconciled() == set()
    assert w.state("new") == "intent"


def test_an_issuance_recorded_during_the_scan_is_left_alone(w: World) -> None:
    w.intent("lost")
    w.store.mark_ambiguous("lost")

    def issuance_completes() -> None:
        w.intent("new")
        w.minted_in_vault("acc-new", "new")
        w.store.record_minted(request_id="new", credential_id="acc-new",
                              expires_at=T0 + timedelta(minutes=2), entity_id="")

    w.vault.on_list = issuance_completes
    assert w.responder.reconcile().revoked == 0
    row = w.store.get("acc-new")
    assert row is not None and row.state == "live" and "acc-new" in w.vault.tokens


def test_an_intent_that_turns_ambiguous_during_the_scan_has_its_token_revoked(w: World
                                                                              ) -> None:
    w.intent("old-lost")
    w.store.mark_ambiguous("old-lost")
    w.intent("late")
    w.minted_in_vault("acc-late", "late")
    w.vault.on_list = lambda: w.store.mark_ambiguous("late")
    assert w.responder.reconcile().revoked == 1
    row = w.store.get("acc-late")
    assert row is not None and row.state == "revoked" and row.request_id == "late"
    assert w.reconciled() == {"acc-late"}


def test_ambiguous_intent_without_a_token_is_dropped_only_once_stale(w: World) -> None:
    w.intent("lost")
    w.store.mark_ambiguous("lost")
    report = w.responder.reconcile()
    assert (report.pending, report.cleared) == (1, 0)
    assert w.state("lost") == "ambiguous"
    w.now += STALE_INTENT
    report = w.responder.reconcile()
    assert (report.pending, report.cleared) == (0, 1)
    assert w.store.intents() == []


def test_a_token_no_intent_knows_is_found_by_the_full_scan(w: World) -> None:
    w.minted_in_vault("acc-stray", "forgotten")
    assert w.responder.reconcile().revoked == 0  # no unresolved intent: no scan
    assert w.responder.reconcile(full=True).revoked == 1
    row = w.store.get("acc-stray")
    assert row is not None and row.state == "revoked" and row.request_id == "forgotten"
    assert w.reconciled() == {"acc-stray"}


def test_tokens_of_other_brokers_are_not_touched(w: World) -> None:
    w.vault.tokens["acc-other"] = {"credbroker": "1", "request_id": "x",
                                   "broker_instance": "someone-else"}
    assert w.responder.reconcile(full=True).revoked == 0
    assert "acc-other" in w.vault.tokens


def test_at_start_up_every_intent_is_resolved(w: World) -> None:
    w.intent("minted-then-crashed")
    w.minted_in_vault("acc-1", "minted-then-crashed")
    w.intent("crashed-before-mint")
    report = w.responder.reconcile(startup=True)
    assert (report.revoked, report.cleared, report.pending) == (1, 1, 0)
    assert w.store.intents() == [] and w.vault.tokens == {}


def test_vault_unreachable_postpones_and_never_raises(w: World) -> None:
    w.intent("lost")
    w.minted_in_vault("acc-lost", "lost")
    w.store.mark_ambiguous("lost")
    w.vault.down = True
    report = w.responder.reconcile(startup=True)
    assert "unreachable" in report.error and report.revoked == 0
    assert w.state("lost") == "ambiguous"
    w.vault.down = False
    assert w.responder.reconcile().revoked == 1


def test_a_direct_scan_during_the_loops_scan_does_not_revoke_and_audit_twice(w: World) -> None:
    """``reconcile(full=True)`` may be called while the reconcile loop is scanning."""
    for i in range(3):
        w.intent(f"lost-{i}")
        w.minted_in_vault(f"acc-{i}", f"lost-{i}")
        w.store.mark_ambiguous(f"lost-{i}")
    revoking = threading.Event()
    go_on = threading.Event()

    def first_scan_pauses_in_its_first_revocation() -> None:
        if not revoking.is_set():
            revoking.set()
            go_on.wait(5)

    w.vault.on_revoke = first_scan_pauses_in_its_first_revocation
    loop = threading.Thread(target=w.responder.reconcile)
    loop.start()
    assert revoking.wait(5)
    direct = threading.Thread(target=lambda: w.responder.reconcile(full=True))
    direct.start()
    direct.join(0.5)  # a second scan now would find the same three tokens
    go_on.set()
    loop.join(5)
    direct.join(5)
    audited = [r["credential_id"] for r in read_records(w.audit_path)
               if r["type"] == "credential.revoked"]
    assert sorted(audited) == ["acc-0", "acc-1", "acc-2"]
