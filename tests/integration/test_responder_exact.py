"""The Responder driven directly (real SQLite registry, real audit file, real OpenBao): what
revoke, freeze, unfreeze, removed classes and reconcile leave in OpenBao, in the registry
and on the record, field by field, including who did it. One OpenBao per module; each test
has its own registry, audit log and workloads."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from broker.adapters.audit import AuditLog, read_records
from broker.adapters.environments import Environments
from broker.adapters.registry import SqliteStore, StoreError
from broker.adapters.vault import FROZEN_POLICY, VaultAdapter
from broker.app.people import PersonRequiredError
from broker.app.responder import BusEvent, Responder, RevocationBus
from broker.core.models import MintedToken
from broker.core.revocation import Selector
from broker.core.scopemap import ScopeMap, parse_scope_map
from broker.core.spiffeid import SpiffeId
from broker.errors import NotFoundError, VaultUnavailableError
from credbroker_dev.devstack import OpenBaoDev, free_port
from tests.integration.conftest import TEST_MAP

ENRICH = "credbroker-enrichment"
ORPHAN_WHY = ("minted for an issuance whose outcome was lost (Vault's answer never "
              "arrived, or the broker died); never handed out")
PERSON = {"kind": "person", "subject": "alice@example.org", "proof": "oidc"}


class World:
    def __init__(self, tmp: Path, own: OpenBaoDev, smap: ScopeMap,
                 environments: Callable[[VaultAdapter], Environments] | None = None) -> None:
        self.own = own
        self.smap = smap
        self.registry_path = tmp / "registry.db"
        self.store = SqliteStore(self.registry_path)
        self.audit_path = tmp / "audit.log"
        self.audit = AuditLog(self.audit_path)
        self.vault = VaultAdapter(addr=own.addr, token=own.root_token)
        self.vault.sync_scope_map(smap)
        self.bus = RevocationBus()
        self.scope_map = smap
        self.responder = Responder(
            store=self.store, vault=self.vault, audit=self.audit, bus=self.bus,
            scope_map=lambda: self.scope_map, clock=lambda: datetime.now(UTC),
            environments=environments(self.vault) if environments else None)
        self.loop = asyncio.new_event_loop()

    def who(self) -> str:
        return f"spiffe://example.org/agent/r{uuid.uuid4().hex[:10]}"

    def mint(self, spiffe_id: str, cls: str = "enrichment", *, target: str = "t",
             record: bool = True, vault: VaultAdapter | None = None,
             environment: str = "") -> MintedToken:
        rid = uuid.uuid4().hex
        now = datetime.now(UTC)
        self.store.record_intent(request_id=rid, spiffe_id=spiffe_id, action_class=cls,
                                 target=target, event_source="", event_id="", at=now,
                                 environment=environment)
        minted = (vault or self.vault).mint(
            cls=self.smap.classes[cls], spiffe_id=SpiffeId.parse(spiffe_id), ttl_seconds=120,
            metadata={"request_id": rid, "broker_instance": self.store.instance_id,
                      "target": target}, now=now)
        if record:
            self.store.record_minted(request_id=rid, credential_id=minted.accessor,
                                     expires_at=minted.expires_at, entity_id=minted.entity_id,
                                     lease_prefix=minted.lease_prefix)
        return minted

    def revoked_by(self, credential_id: str) -> tuple[object, ...]:
        """The registry's own columns (read from its file): who, why, by which selector."""
        with sqlite3.connect(self.registry_path) as db:
            row = db.execute("SELECT revoked_by, revoke_reason, revoke_selector FROM "
                             "credentials WHERE credential_id=?", (credential_id,)).fetchone()
        return tuple(row)

    def records(self, type_: str) -> list[dict[str, Any]]:
        return [r for r in read_records(self.audit_path) if r["type"] == type_]

    def events(self, spiffe_id: str) -> Callable[[], list[BusEvent | None]]:
        sub = self.bus.subscribe(spiffe_id, self.loop)
        assert sub is not None

        def drain() -> list[BusEvent | None]:
            self.loop.run_until_complete(asyncio.sleep(0.01))
            out = []
            while not sub.queue.empty():
                out.append(sub.queue.get_nowait())
            return out
        return drain

    def join(self) -> None:
        t = self.responder.last_freeze_revocation
        if t is not None:
            t.join(15)

    def close(self) -> None:
        self.responder.close()
        self.loop.close()


@pytest.fixture
def w(tmp_path: Path, own: OpenBaoDev, smap: ScopeMap) -> Iterator[World]:
    world = World(tmp_path, own, smap)
    yield world
    world.close()
    # Give back every policy and entity frozen here (the OpenBao is the module's).
    for _f, entities in world.store.active_freezes():
        for e in entities:
            world.vault.set_entity_disabled(e.rpartition("#")[2], False)
    for cls in smap.classes.values():
        world.vault.restore_class_policy(cls)


def alive(root: hvac.Client, accessor: str) -> bool:
    try:
        root.auth.token.lookup_accessor(accessor)
        return True
    except hvac.exceptions.InvalidRequest:
        return False


def works(own: OpenBaoDev, token: str) -> bool:
    try:
        hvac.Client(url=own.addr, token=token).secrets.kv.v2.read_secret_version(
            path="soc/enrichment/ti", raise_on_deleted_version=False)
        return True
    except hvac.exceptions.Forbidden:
        return False


def entity_disabled(root: hvac.Client, entity_id: str) -> bool:
    return bool(root.read(f"identity/entity/id/{entity_id}")["data"]["disabled"])


def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


# -- revocation


def test_revoking_rows_ends_the_tokens_records_and_announces_who_did_it(
        w: World, root: hvac.Client) -> None:
    me = w.who()
    heard = w.events(me)
    a, b = w.mint(me), w.mint(me)
    dead = w.mint(me)
    root.auth.token.revoke_accessor(dead.accessor)  # gone before the responder asks
    rows = [w.store.get(m.accessor) for m in (a, b, dead)]
    actor = {"kind": "automation", "subject": "soar"}
    outcomes = list(w.responder.revoke([r for r in rows if r is not None], by="ir-1",
                                       reason="phished", selector="--spiffe-id x",
                                       actor=actor))
    assert sorted((o.credential_id, o.result) for o in outcomes) == sorted(
        [(a.accessor, "revoked"), (b.accessor, "revoked"), (dead.accessor, "already_dead")])
    assert not alive(root, a.accessor) and not alive(root, b.accessor)
    for m in (a, b, dead):
        row = w.store.get(m.accessor)
        assert row is not None and row.state == "revoked" and not row.revoke_pending
    assert w.revoked_by(a.accessor) == ("ir-1", "phished", "--spiffe-id x")
    [rec] = w.records("credentials.revoked")
    assert rec["by"] == "ir-1" and rec["reason"] == "phished"
    assert rec["selector"] == "--spiffe-id x" and rec["actor"] == actor
    assert sorted(rec["credential_ids"]) == sorted(m.accessor for m in (a, b, dead))
    assert rec["counts"] == {"revoked": 2, "already_dead": 1, "pending": 0, "failed": 0}
    assert rec["failed_ids"] == [] and "environments" not in rec
    [event] = heard()
    assert isinstance(event, BusEvent)
    assert sorted(event.credential_ids) == sorted(m.accessor for m in (a, b, dead))
    assert (event.reason, event.by) == ("phished", "ir-1")


def test_without_vault_a_revocation_is_pending_then_retried(
        w: World, root: hvac.Client, own: OpenBaoDev) -> None:
    m = w.mint(w.who())
    row = w.store.get(m.accessor)
    assert row is not None
    w.responder.vaults = Environments.single(
        VaultAdapter(addr=f"http://127.0.0.1:{free_port()}", token="t", timeout=1))
    o = w.responder.revoke_one(row, by="ir-1", reason="r", selector="s")
    assert o.result == "pending" and "unreachable" in o.error
    assert [r.credential_id for r in w.store.pending_revocations()] == [m.accessor]
    assert w.responder.retry_pending() == 1 and alive(root, m.accessor)
    w.responder.vaults = Environments.single(w.vault)
    assert w.responder.retry_pending() == 0
    assert not alive(root, m.accessor) and w.store.pending_revocations() == []


def test_revoke_whole_ends_each_identity_by_prefix_and_audits_it(
        w: World, root: hvac.Client) -> None:
    me, other = w.who(), w.who()
    mine = [w.mint(me) for _ in range(3)]
    theirs = w.mint(other)
    unrecorded = w.mint(me, record=False)  # minted meanwhile: the prefix ends it too
    rows = [r for r in (w.store.get(m.accessor) for m in mine) if r is not None]
    outcomes = w.responder.revoke_whole(rows, by="ir-2", reason="contain",
                                        selector="freeze x", actor=PERSON)
    assert sorted(o.credential_id for o in outcomes) == sorted(m.accessor for m in mine)
    assert {o.result for o in outcomes} == {"revoked"}
    assert not any(alive(root, m.accessor) for m in [*mine, unrecorded])
    assert alive(root, theirs.accessor)
    assert all(w.store.get(m.accessor).state == "revoked" for m in mine)  # type: ignore[union-attr]
    [rec] = w.records("credentials.revoked")
    assert (rec["by"], rec["reason"], rec["selector"]) == ("ir-2", "contain", "freeze x")
    assert rec["vault_revoke_prefixes"] == 1 and rec["actor"] == PERSON
    assert rec["counts"]["revoked"] == 3


# -- freeze and unfreeze


def test_an_identity_freeze_disables_its_entity_and_is_on_record(
        w: World, root: hvac.Client, own: OpenBaoDev) -> None:
    me, bystander = w.who(), w.who()
    heard = w.events(me)
    tokens = [w.mint(me), w.mint(me)]
    safe = w.mint(bystander)
    res = w.responder.freeze(spiffe_id=me, action_class="", reason="rogue", by="ir-3",
                             actor=PERSON)
    assert not res.vault_pending and res.vault_error == ""
    assert res.credentials_matched == 2 and res.entities_disabled == 1
    assert not res.policy_frozen and res.enforced_ms > 0
    assert res.freeze.by == "ir-3" and res.freeze.reason == "rogue"
    assert len(res.freeze.id) == 12 and res.freeze.kind == "spiffe_id"
    assert entity_disabled(root, tokens[0].entity_id)
    assert not any(works(own, t.token) for t in tokens) and works(own, safe.token)
    w.join()
    assert not any(alive(root, t.accessor) for t in tokens)
    [fz] = w.records("freeze")
    assert fz["freeze_id"] == res.freeze.id and fz["kind"] == "spiffe_id"
    assert (fz["pattern"], fz["reason"], fz["by"], fz["actor"]) == (me, "rogue", "ir-3", PERSON)
    assert "rule" not in fz
    [enf] = w.records("freeze.enforced")
    assert enf["freeze_id"] == res.freeze.id and enf["by"] == "ir-3"
    assert enf["credentials_matched"] == 2
    assert enf["vault_entities_disabled"] == [tokens[0].entity_id]
    assert enf["vault_policy_frozen"] is False and enf["vault_error"] == ""
    [revoked] = w.records("credentials.revoked")
    assert revoked["selector"] == f"freeze {res.freeze.id}" and revoked["actor"] == PERSON
    [event, *_] = heard()
    assert isinstance(event, BusEvent)
    assert (event.identity_pattern, event.action_class) == (me, "")
    assert (event.reason, event.by) == ("rogue", "ir-3")
    assert [f.id for f in w.responder.freezes] == [res.freeze.id]


def test_an_identity_that_never_minted_is_frozen_in_vault_too(
        w: World, root: hvac.Client) -> None:
    me = w.who()
    res = w.responder.freeze(spiffe_id=me, action_class="", reason="pre-emptive", by="ir")
    assert not res.vault_pending and res.vault_error == "" and res.entities_disabled == 0
    m = w.mint(me, record=False)  # its entity is made by this mint...
    assert m.entity_id  # ...and unfreeze must not fail on an entity it never disabled
    w.responder.unfreeze(spiffe_id=me, action_class="", reason="ok", by="ir")


def test_a_class_freeze_empties_the_policy_and_unfreeze_restores_it(
        w: World, root: hvac.Client, own: OpenBaoDev, smap: ScopeMap) -> None:
    me = w.who()
    heard = w.events(me)
    m = w.mint(me)
    res = w.responder.freeze(spiffe_id="", action_class="enrichment", reason="leak",
                             by="ir-4", rule="limits")
    assert res.policy_frozen and res.entities_disabled == 0 and not res.vault_pending
    assert root.sys.read_policy(ENRICH)["data"]["rules"] == FROZEN_POLICY
    assert not works(own, m.token)
    [fz] = w.records("freeze")
    assert fz["rule"] == "limits" and "actor" not in fz
    [enf] = w.records("freeze.enforced")
    assert enf["vault_policy_frozen"] is True and enf["vault_entities_disabled"] == []
    [event, *_] = heard()
    assert isinstance(event, BusEvent)
    assert (event.action_class, event.identity_pattern) == ("enrichment", "")
    w.join()
    with pytest.raises(NotFoundError) as err:
        w.responder.unfreeze(spiffe_id="", action_class="containment.isolate_host",
                             reason="x", by="ir-4")
    assert str(err.value) == ("nothing is frozen as action class 'containment.isolate_host'; "
                              "see `credbroker freeze --list`")
    lifted = w.responder.unfreeze(spiffe_id="", action_class="enrichment", reason="clear",
                                  by="ir-5", actor=PERSON)
    assert [f.id for f in lifted] == [res.freeze.id]
    assert root.sys.read_policy(ENRICH)["data"]["rules"] == \
        smap.classes["enrichment"].vault_policy_hcl()
    [un] = w.records("unfreeze")
    assert (un["kind"], un["pattern"], un["reason"], un["by"], un["actor"]) == (
        "action_class", "enrichment", "clear", "ir-5", PERSON)
    assert w.responder.freezes == [] and w.store.active_freezes() == []


def test_unfreezing_one_identity_leaves_another_frozen(
        w: World, root: hvac.Client, own: OpenBaoDev) -> None:
    a, b = w.who(), w.who()
    ta, tb = w.mint(a), w.mint(b)
    w.responder.freeze(spiffe_id=a, action_class="", reason="x", by="ir")
    w.responder.freeze(spiffe_id=b, action_class="", reason="y", by="ir")
    w.join()
    w.responder.unfreeze(spiffe_id=a, action_class="", reason="done", by="ir")
    assert not entity_disabled(root, ta.entity_id)
    assert entity_disabled(root, tb.entity_id)
    assert [f.pattern for f in w.responder.freezes] == [b]


def test_an_automatic_freeze_is_lifted_only_by_a_person(w: World, root: hvac.Client) -> None:
    me = w.who()
    w.mint(me)
    w.responder.freeze(spiffe_id=me, action_class="", reason="runaway", by="credbroker")
    with pytest.raises(PersonRequiredError) as err:
        w.responder.unfreeze(spiffe_id=me, action_class="", reason="x", by="bot")
    assert str(err.value).startswith(f"{me} was frozen by credbroker (runaway); only a person "
                                     "may lift that, not bot: ")
    assert w.records("unfreeze") == []
    w.responder.unfreeze(spiffe_id=me, action_class="", reason="x", by="alice", actor=PERSON)


def test_a_freeze_vault_cannot_enforce_is_pending_then_enforced(
        w: World, root: hvac.Client, own: OpenBaoDev) -> None:
    me = w.who()
    m = w.mint(me)
    down = VaultAdapter(addr=f"http://127.0.0.1:{free_port()}", token="t", timeout=1)
    w.responder.vaults = Environments.single(down)
    res = w.responder.freeze(spiffe_id=me, action_class="", reason="r", by="ir")
    assert res.vault_pending and res.entities_disabled == 0 and "unreachable" in res.vault_error
    [pending] = w.records("freeze.enforcement_pending")
    assert pending["vault_entities_disabled"] == [] and pending["vault_enforced_ms"] is None
    assert pending["vault_error"] == res.vault_error
    assert not entity_disabled(root, m.entity_id)
    w.join()
    assert [r.credential_id for r in w.store.pending_revocations()] == [m.accessor]
    assert w.responder.enforce_pending_freezes() == 1
    w.responder.vaults = Environments.single(w.vault)
    assert w.responder.enforce_pending_freezes() == 0
    assert entity_disabled(root, m.entity_id)
    [enf] = w.records("freeze.enforced")
    assert (enf["freeze_id"], enf["by"]) == (res.freeze.id, "credbroker")
    assert enf["vault_entities_disabled"] == [m.entity_id]
    # Vault gone again while unfreezing: the freeze stays, enforced again later.
    w.responder.vaults = Environments.single(down)
    with pytest.raises(VaultUnavailableError) as err:
        w.responder.unfreeze(spiffe_id=me, action_class="", reason="ok", by="ir")
    assert str(err.value).startswith(f"the freeze of {me} stays in force: Vault did not give "
                                     "the power back (")
    assert [f.id for f, _ in w.store.unenforced_freezes()] == [res.freeze.id]
    [failed] = w.records("unfreeze.failed")
    assert failed["pattern"] == me and failed["by"] == "ir"
    w.responder.vaults = Environments.single(w.vault)


def test_leftovers_of_an_old_freeze_are_revoked_by_the_freezes_author(
        w: World, root: hvac.Client) -> None:
    me = w.who()
    res = w.responder.freeze(spiffe_id="", action_class="enrichment", reason="old",
                             by="ir-6")
    w.join()
    late = w.mint(me)  # minted in a race with the freeze
    assert w.responder.revoke_frozen_leftovers(min_age=timedelta(0)) == 1
    assert not alive(root, late.accessor)
    [rec] = [r for r in w.records("credentials.revoked") if late.accessor in r["credential_ids"]]
    assert (rec["by"], rec["reason"], rec["selector"]) == ("ir-6", "old",
                                                           f"freeze {res.freeze.id}")
    assert w.revoked_by(late.accessor) == ("ir-6", "old", f"freeze {res.freeze.id}")
    assert w.responder.revoke_frozen_leftovers(min_age=timedelta(0)) == 0
    # An identity freeze: an entity it did not cover yet is disabled too.
    them = w.who()
    idf = w.responder.freeze(spiffe_id=them, action_class="", reason="id", by="ir-7")
    w.join()
    other = w.mint(them, "containment.isolate_host")
    w.vault.set_entity_disabled(other.entity_id, False)  # as if it came after the freeze
    assert w.responder.revoke_frozen_leftovers(min_age=timedelta(0)) == 1
    assert entity_disabled(root, other.entity_id) and not alive(root, other.accessor)
    assert [r.credential_id for r in w.store.live(Selector(all=True), datetime.now(UTC))
            if r.spiffe_id == them] == []
    assert idf.freeze.kind == "spiffe_id"


def test_a_class_freezes_leftovers_give_it_no_entity_for_its_unfreeze_to_enable(
        w: World, root: hvac.Client) -> None:
    me = w.who()
    res = w.responder.freeze(spiffe_id="", action_class="enrichment", reason="leak",
                             by="ir-8")
    w.join()
    late = w.mint(me)  # minted in a race with the freeze
    # An operator disabled this workload's entity by hand, for reasons of their own.
    root.write(f"identity/entity/id/{late.entity_id}", disabled=True)
    try:
        assert w.responder.revoke_frozen_leftovers(min_age=timedelta(0)) == 1
        assert not alive(root, late.accessor)
        [(fz, entities)] = w.store.active_freezes()
        assert (fz.id, entities) == (res.freeze.id, [])  # a class freeze disables no entity
        w.responder.unfreeze(spiffe_id="", action_class="enrichment", reason="clear",
                             by="ir-8")
        assert entity_disabled(root, late.entity_id)  # so its unfreeze enables none
    finally:
        root.write(f"identity/entity/id/{late.entity_id}", disabled=False)


def test_enforcement_the_registry_cannot_record_is_logged_and_recorded_later(
        w: World, root: hvac.Client, caplog: pytest.LogCaptureFixture) -> None:
    me = w.who()
    m = w.mint(me)
    w.responder.vaults = Environments.single(
        VaultAdapter(addr=f"http://127.0.0.1:{free_port()}", token="t", timeout=1))
    res = w.responder.freeze(spiffe_id=me, action_class="", reason="rogue", by="ir")
    assert res.vault_pending
    w.join()
    w.responder.vaults = Environments.single(w.vault)
    # Another process holds the registry's write lock (reads still work: WAL) for longer
    # than the registry waits for it.
    lock = sqlite3.connect(w.registry_path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    caplog.clear()
    try:
        with caplog.at_level(logging.ERROR, logger="credbroker.responder"):
            assert w.responder.enforce_pending_freezes() == 0
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert entity_disabled(root, m.entity_id)  # Vault enforces it...
    assert [r.getMessage() for r in caplog.records
            if r.name == "credbroker.responder" and r.levelno >= logging.ERROR] == [
        f"freeze {res.freeze.id}: could not record its Vault enforcement: the credential "
        f"registry {w.registry_path} failed: database is locked"]
    # ...and the registry, which could not hear it, has it enforced on the next round.
    assert [f.id for f, _ in w.store.unenforced_freezes()] == [res.freeze.id]
    assert w.responder.enforce_pending_freezes() == 0
    assert w.store.unenforced_freezes() == []
    assert entity_disabled(root, m.entity_id)


def test_a_lift_the_registry_refuses_after_vault_gave_the_power_back_is_enforced_again(
        w: World, root: hvac.Client, own: OpenBaoDev) -> None:
    me = w.who()
    m = w.mint(me)
    res = w.responder.freeze(spiffe_id=me, action_class="", reason="rogue", by="ir")
    w.join()
    # The registry refuses to record the lift (a guard on its file) but takes other writes.
    with closing(sqlite3.connect(w.registry_path)) as db, db:
        db.execute("CREATE TRIGGER no_lift BEFORE UPDATE OF lifted_at ON freezes "
                   "BEGIN SELECT RAISE(ABORT, 'lifting is refused'); END")
    with pytest.raises(StoreError) as err:
        w.responder.unfreeze(spiffe_id=me, action_class="", reason="ok", by="ir")
    assert str(err.value) == (f"the credential registry {w.registry_path} failed: lifting "
                              "is refused")
    assert not entity_disabled(root, m.entity_id)  # Vault gave the power back...
    # The log said "unfreeze" first; it also says the freeze stayed in force, and why.
    [failed] = w.records("unfreeze.failed")
    assert (failed["kind"], failed["pattern"], failed["by"], failed["error"]) == (
        "spiffe_id", me, "ir", f"the registry could not record the lift: {err.value}")
    # ...but the freeze is still recorded, so it is marked for Vault to enforce again.
    assert [f.id for f, _ in w.store.unenforced_freezes()] == [res.freeze.id]
    with closing(sqlite3.connect(w.registry_path)) as db, db:
        db.execute("DROP TRIGGER no_lift")
    assert w.responder.enforce_pending_freezes() == 0
    assert entity_disabled(root, m.entity_id)
    [again] = w.records("freeze.enforced")[1:]
    assert (again["freeze_id"], again["by"]) == (res.freeze.id, "credbroker")
    w.responder.unfreeze(spiffe_id=me, action_class="", reason="ok", by="ir")
    assert not entity_disabled(root, m.entity_id)


# -- classes removed from the scope map


def test_a_removed_class_is_emptied_announced_and_revoked(
        w: World, root: hvac.Client, smap: ScopeMap) -> None:
    me = w.who()
    heard = w.events(me)
    m = w.mint(me)
    smaller = parse_scope_map([(str(TEST_MAP), TEST_MAP.read_text().replace(
        "  enrichment:", "  enrichment_old:"))])
    acted = w.responder.end_removed_classes(smaller)
    assert acted == ["enrichment"]
    assert root.sys.read_policy(ENRICH)["data"]["rules"] == FROZEN_POLICY
    why = "action class enrichment was removed from the scope map"
    [rec] = w.records("scope_map.class_removed")
    assert (rec["action_class"], rec["credentials_matched"], rec["vault_policy_emptied"],
            rec["vault_error"], rec["by"]) == ("enrichment", 1, True, "", "credbroker")
    assert rec["scope_map_version"] == smaller.version
    [event, *_] = heard()
    assert isinstance(event, BusEvent)
    assert (event.action_class, event.reason, event.by) == ("enrichment", why, "credbroker")
    until(lambda: not alive(root, m.accessor), "the removed class's token was not revoked")
    until(lambda: bool(w.records("credentials.revoked")), "no revocation on record")
    [revoked] = w.records("credentials.revoked")
    assert (revoked["by"], revoked["reason"], revoked["selector"]) == (
        "credbroker", why, "class removed enrichment")
    assert w.revoked_by(m.accessor) == ("credbroker", why, "class removed enrichment")
    assert w.responder.end_removed_classes(smaller) == []  # handled once


def test_a_class_removed_with_nothing_live_is_still_emptied(
        w: World, root: hvac.Client, smap: ScopeMap) -> None:
    assert w.responder.end_removed_classes(smap, removed=["gone"]) == ["gone"]
    assert root.sys.read_policy("credbroker-gone")["data"]["rules"] == FROZEN_POLICY
    down = VaultAdapter(addr=f"http://127.0.0.1:{free_port()}", token="t", timeout=1)
    w.responder.vaults = Environments.single(down)
    assert w.responder.end_removed_classes(smap, removed=["gone2"]) == ["gone2"]
    rec = w.records("scope_map.class_removed")[-1]
    assert rec["vault_policy_emptied"] is False
    assert rec["vault_error"].startswith(f"Vault at {down.addr} is unreachable while trying "
                                         "to empty policy credbroker-gone2")
    w.responder.vaults = Environments.single(w.vault)
    assert w.responder.end_removed_classes(smap, removed=["gone2"]) == ["gone2"]  # retried
    assert root.sys.read_policy("credbroker-gone2")["data"]["rules"] == FROZEN_POLICY


# -- reconcile


def test_an_orphan_token_is_revoked_recorded_and_audited_in_full(
        w: World, root: hvac.Client) -> None:
    me = w.who()
    known = w.mint(me)
    orphan = w.mint(me, record=False, target="host-9")
    for intent in w.store.intents():  # as if the broker died between mint and record
        w.store.forget_intent(intent.request_id)
    report = w.responder.reconcile(full=True)
    assert (report.revoked, report.error) == (1, "")
    assert not alive(root, orphan.accessor) and alive(root, known.accessor)
    row = w.store.get(orphan.accessor)
    assert row is not None and row.state == "revoked"
    assert (row.spiffe_id, row.action_class, row.target, row.entity_id) == (
        me, "enrichment", "host-9", "")
    [rec] = w.records("credential.revoked")
    assert rec["credential_id"] == orphan.accessor and rec["request_id"] == row.request_id
    assert (rec["spiffe_id"], rec["action_class"], rec["by"], rec["selector"],
            rec["reason"]) == (me, "enrichment", "credbroker", "reconcile", ORPHAN_WHY)
    assert "environment" not in rec


def test_a_token_an_operator_minted_by_hand_with_the_brokers_marks_is_an_orphan_of_nobody(
        w: World, root: hvac.Client) -> None:
    made = root.auth.token.create(policies=[ENRICH], ttl="10m", meta={
        "credbroker": "1", "broker_instance": w.store.instance_id})
    accessor = made["auth"]["accessor"]
    report = w.responder.reconcile(full=True)
    assert (report.revoked, report.error) == (1, "")
    assert not alive(root, accessor)
    row = w.store.get(accessor)
    assert row is not None and row.state == "revoked"
    assert (row.request_id, row.spiffe_id, row.action_class, row.target) == (
        f"orphan-{accessor}", "", "", "")
    assert w.revoked_by(accessor) == ("credbroker", ORPHAN_WHY, "reconcile")
    [rec] = w.records("credential.revoked")
    assert (rec["credential_id"], rec["request_id"], rec["spiffe_id"], rec["action_class"]) == (
        accessor, f"orphan-{accessor}", "", "")


def test_reconcile_without_vault_says_why_and_asks_known_tokens_once(
        w: World, own: OpenBaoDev) -> None:
    from tests.integration.helpers import TcpProxy
    link = TcpProxy(own.port)
    try:
        w.mint(w.who())
        hvac.Client(url=own.addr, token=own.root_token).auth.token.create(
            policies=["default"], ttl="10m")  # not this broker's
        w.responder.vaults = Environments.single(VaultAdapter(addr=link.addr,
                                                              token=own.root_token))
        assert w.responder.reconcile(full=True).error == ""
        link.fail_answers(b"lookup-accessor")  # known and foreign tokens are not asked again
        assert w.responder.reconcile(full=True).error == ""
        link.cut()
        report = w.responder.reconcile(full=True)
        assert report.error == (f"Vault at {link.addr} is unreachable while trying to list "
                                "token accessors (ConnectionError); check that Vault/OpenBao "
                                "is running and reachable")
    finally:
        link.cut()


def test_the_reconcile_loop_runs_on_the_leader_only(w: World, root: hvac.Client) -> None:
    me = w.who()
    orphan = w.mint(me, record=False)
    for intent in w.store.intents():
        w.store.mark_ambiguous(intent.request_id)
    leader = threading.Event()
    w.responder.is_leader = leader.is_set
    loop = threading.Thread(target=w.responder.run_reconcile_loop,
                            kwargs={"interval": 0.05}, daemon=True)
    loop.start()
    try:
        time.sleep(0.3)
        assert alive(root, orphan.accessor)  # not the leader: nothing done
        leader.set()
        w.responder.reconcile_soon()
        until(lambda: not alive(root, orphan.accessor), "the leader's loop did not reconcile")
    finally:
        w.responder.close()
        loop.join(5)
