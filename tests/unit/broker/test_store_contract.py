"""Every CredentialStore, SQLite and PostgreSQL, keeps the same promises (no other servers).

intent -> live -> revoked (pending or confirmed); intent -> ambiguous -> dropped or
recorded by the reconcile; freezes recorded unenforced, then enforced, then lifted;
approvals saved, replaced, deleted; budgets counted, held and given back, exactly, also by
two stores (as two brokers) on one database at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.adapters.registry import SCHEMA_VERSION, SqlStore, StoreError, open_store
from broker.core.revocation import Freeze, Selector
from broker.errors import InvalidRequestError
from credbroker_dev.devpg import PgServer

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
TRIAGE = "spiffe://example.org/agent/triage"
OTHER = "spiffe://example.org/agent/containment"
DAY = timedelta(days=1)

Opener = Callable[[], SqlStore]


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store on one fresh database (each call: another broker on the same one)."""
    opened: list[SqlStore] = []
    if request.param == "sqlite":
        path = tmp_path / "registry.db"

        def open_one() -> SqlStore:
            opened.append(open_store(registry=path))
            return opened[-1]
    else:
        pg: PgServer = request.getfixturevalue("postgres")
        url = pg.new_database()

        def open_one() -> SqlStore:
            opened.append(open_store(url=url, pool_size=4))
            return opened[-1]
    yield open_one
    for s in opened:
        s.close()  # idempotent: some tests close theirs already


@pytest.fixture
def store(opener: Opener) -> SqlStore:
    return opener()


def _intent(store: SqlStore, rid: str, at: datetime = T0, who: str = TRIAGE,
            cls: str = "enrichment") -> None:
    store.record_intent(request_id=rid, spiffe_id=who, action_class=cls,
                        target="t", event_source="", event_id="", at=at)


def _live(store: SqlStore, rid: str, acc: str, *, at: datetime = T0, who: str = TRIAGE,
          cls: str = "enrichment", entity: str = "") -> None:
    _intent(store, rid, at, who, cls)
    store.record_minted(request_id=rid, credential_id=acc,
                        expires_at=at + timedelta(minutes=2), entity_id=entity)


def _states(store: SqlStore) -> dict[str, str]:
    return {r.request_id: r.state for r in store.intents()}


def test_an_intent_is_unresolved_until_minted(store: SqlStore) -> None:
    _intent(store, "r1")
    assert _states(store) == {"r1": "intent"}
    assert store.known_credential_ids() == set()
    store.record_minted(request_id="r1", credential_id="acc-1",
                        expires_at=T0 + timedelta(minutes=2), entity_id="e1")
    assert store.intents() == []
    row = store.get("acc-1")
    assert row is not None and row.state == "live" and row.entity_id == "e1"
    assert row.issued_at == T0 and row.expires_at == T0 + timedelta(minutes=2)
    assert (row.spiffe_id, row.action_class, row.target) == (TRIAGE, "enrichment", "t")
    assert store.get("acc-nope") is None
    assert store.known_credential_ids() == {"acc-1"}
    assert store.count_live(T0) == 1 and store.count_live(T0 + timedelta(minutes=3)) == 0


def test_a_request_id_is_used_once(store: SqlStore) -> None:
    _intent(store, "r1")
    with pytest.raises(InvalidRequestError, match="already used"):
        _intent(store, "r1")


def test_a_request_id_is_used_once_across_brokers(opener: Opener) -> None:
    a, b = opener(), opener()
    _intent(a, "r1")
    with pytest.raises(InvalidRequestError, match="already used"):
        _intent(b, "r1")


def test_ambiguous_intent_is_kept_until_resolved(store: SqlStore) -> None:
    _intent(store, "lost")
    _intent(store, "fine", at=T0 + timedelta(seconds=1))
    store.mark_ambiguous("lost")
    assert _states(store) == {"lost": "ambiguous", "fine": "intent"}
    assert [r.request_id for r in store.intents()] == ["lost", "fine"]  # oldest first
    store.forget_intent("lost")  # a scan showed Vault holds no token for it
    assert _states(store) == {"fine": "intent"}


def test_ambiguous_intent_whose_token_was_found_is_recorded_revoked(store: SqlStore) -> None:
    """What the reconcile does with a token found for an ambiguous intent."""
    _intent(store, "lost")
    store.mark_ambiguous("lost")
    store.record_minted(request_id="lost", credential_id="acc-9", expires_at=T0, entity_id="")
    store.mark_revoked("acc-9", by="credbroker", reason="outcome lost", selector="reconcile",
                       at=T0, pending=False)
    assert store.intents() == []
    row = store.get("acc-9")
    assert row is not None and row.state == "revoked" and not row.revoke_pending
    assert store.live(Selector.build(all=True), T0 - timedelta(minutes=1)) == []


def test_only_unresolved_rows_can_be_made_ambiguous_or_forgotten(store: SqlStore) -> None:
    _live(store, "r1", "acc-1")
    store.mark_ambiguous("r1")  # too late: it was minted and recorded
    store.forget_intent("r1")  # must never drop a credential's row
    row = store.get("acc-1")
    assert row is not None and row.state == "live"
    store.mark_ambiguous("no-such-request")  # harmless
    store.forget_intent("no-such-request")


def test_pending_revocation_is_retried_until_confirmed(store: SqlStore) -> None:
    _live(store, "r1", "acc-1")
    store.mark_revoked("acc-1", by="admin", reason="drill", selector="freeze f1", at=T0,
                       pending=True, error="Vault unreachable")
    (pending,) = store.pending_revocations()
    assert pending.credential_id == "acc-1" and pending.state == "revoked"
    assert pending.revoke_pending
    assert store.live(Selector.build(all=True), T0) == []  # no longer handed out as live
    store.mark_revoked_many(["acc-1"], by="credbroker", reason="retry", selector="pending",
                            at=T0 + timedelta(seconds=5))
    assert store.pending_revocations() == []
    (facts,) = store._exec("SELECT revoked_by, revoke_selector, revoke_error FROM credentials")
    assert facts == ("admin", "freeze f1", "")  # the first revocation's facts are kept


def test_live_selects_by_class_identity_and_credential(store: SqlStore) -> None:
    _live(store, "r1", "acc-1")
    _live(store, "r2", "acc-2", at=T0 + timedelta(seconds=1), cls="containment")
    _live(store, "r3", "acc-3", at=T0 + timedelta(seconds=2), who=OTHER)
    now = T0 + timedelta(seconds=30)
    ids = lambda sel: [r.credential_id for r in store.live(sel, now)]  # noqa: E731
    assert ids(Selector.build(all=True)) == ["acc-1", "acc-2", "acc-3"]  # oldest first
    assert ids(Selector.build(action_class="enrichment")) == ["acc-1", "acc-3"]
    assert ids(Selector.build(spiffe_id=TRIAGE)) == ["acc-1", "acc-2"]
    assert ids(Selector.build(credential_ids=["acc-2"])) == ["acc-2"]
    assert sorted(store.live_ids_of(OTHER, now)) == ["acc-3"]
    assert store.live_ids_of(OTHER, T0 + timedelta(minutes=5)) == []
    assert store.count_live(now) == 3


def test_initiating_events_and_entities(store: SqlStore) -> None:
    store.record_intent(request_id="r1", spiffe_id=TRIAGE, action_class="enrichment",
                        target="", event_source="splunk", event_id="N-1", at=T0)
    store.record_minted(request_id="r1", credential_id="acc-1", expires_at=T0 + DAY,
                        entity_id="ent-triage")
    _live(store, "r2", "acc-2", who=OTHER, entity="ent-other")
    ids = [f"acc-x{i}" for i in range(1200)] + ["acc-1", "acc-2"]  # more than one chunk
    assert store.initiating_events(ids) == {"acc-1": ("splunk", "N-1")}
    assert store.entity_ids(Selector.build(spiffe_id=TRIAGE)) == {"ent-triage": TRIAGE}
    assert store.entity_ids(Selector.build(spiffe_id="spiffe://example.org/agent/*")) == {
        "ent-triage": TRIAGE, "ent-other": OTHER}


def test_freeze_recorded_unenforced_then_enforced_then_lifted(store: SqlStore) -> None:
    fz = Freeze(id="f1", kind="spiffe_id", pattern=TRIAGE, reason="drill", by="admin",
                created_at=T0)
    store.add_freeze(fz, ["e1"])
    assert store.freezes() == [fz]  # in force for issuance at once, every field kept
    assert [(f.id, es) for f, es in store.unenforced_freezes()] == [("f1", ["e1"])]
    store.set_freeze_enforcement("f1", entity_ids=["e1"], enforced=False,
                                 error="Vault unreachable")
    assert [f.id for f, _ in store.unenforced_freezes()] == ["f1"]  # retried
    store.set_freeze_enforcement("f1", entity_ids=["e2", "e1", "e1"], enforced=True, error="")
    assert store.unenforced_freezes() == []
    assert store.active_freezes() == [(fz, ["e1", "e2"])]
    assert store.frozen_entities() == {"e1", "e2"}
    lifted = store.lift_freezes("spiffe_id", TRIAGE, by="admin", reason="over", at=T0)
    assert [f.id for f, _ in lifted] == ["f1"]
    assert store.freezes() == [] and store.active_freezes() == []
    assert store.unenforced_freezes() == []  # a lifted freeze is not enforced any more
    assert store.frozen_entities() == set()
    assert store.lift_freezes("spiffe_id", TRIAGE, by="admin", reason="again", at=T0) == []


def test_a_freeze_through_one_broker_is_read_by_another(opener: Opener) -> None:
    a, b = opener(), opener()
    a.add_freeze(Freeze(id="f1", kind="action_class", pattern="enrichment", reason="r",
                        by="alice", created_at=T0), [])
    assert [f.id for f in b.freezes()] == ["f1"]
    b.lift_freezes("action_class", "enrichment", by="bob", reason="ok", at=T0)
    assert a.freezes() == []


def test_approvals_are_saved_replaced_and_deleted(store: SqlStore) -> None:
    store.save_approval("a1", "pending", '{"id": "a1", "v": 1}')
    store.save_approval("a2", "pending", '{"id": "a2"}')
    store.save_approval("a1", "approved", '{"id": "a1", "v": 2}')
    assert store.load_approvals() == ['{"id": "a1", "v": 2}', '{"id": "a2"}']
    store.delete_approval("a2")
    store.delete_approval("nope")
    assert store.load_approvals() == ['{"id": "a1", "v": 2}']


def test_an_approval_is_changed_only_over_what_its_writer_read(opener: Opener) -> None:
    """Two brokers voting on one approval at once: the second write, made over a state
    the first already replaced, is refused (it reads again and decides again)."""
    a, b = opener(), opener()
    assert a.replace_approval("a1", "pending", "v1", previous=None)
    assert not b.replace_approval("a1", "pending", "v1-again", previous=None)  # exists
    assert b.load_approval("a1") == "v1"
    assert a.replace_approval("a1", "pending", "v2 (a voted)", previous="v1")
    assert not b.replace_approval("a1", "approved", "v2 (b voted)", previous="v1")
    assert b.load_approval("a1") == "v2 (a voted)"
    assert b.replace_approval("a1", "approved", "v3 (b voted too)", previous="v2 (a voted)")
    assert a.load_approval("a1") == "v3 (b voted too)"
    assert a.load_approval("nope") is None


def test_events_are_read_in_sequence_by_every_store_on_the_database(opener: Opener) -> None:
    a, b = opener(), opener()
    start = b.last_event_seq()
    seqs = [a.append_event(origin="ra", kind="revoked", data=f'{{"n": {n}}}', at=T0)
            for n in range(3)]
    seqs.append(b.append_event(origin="rb", kind="freeze", data="{}", at=T0 + DAY))
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    got = b.events_after(start)
    assert [(e.seq, e.origin, e.kind) for e in got] == [
        (seqs[0], "ra", "revoked"), (seqs[1], "ra", "revoked"), (seqs[2], "ra", "revoked"),
        (seqs[3], "rb", "freeze")]
    assert got[1].data == '{"n": 1}'
    assert [e.seq for e in a.events_after(seqs[1], limit=1)] == [seqs[2]]
    assert a.last_event_seq() == seqs[3]
    assert a.prune_events(T0 + timedelta(hours=1)) == 3
    assert [e.seq for e in b.events_after(start)] == [seqs[3]]
    assert b.append_event(origin="rb", kind="x", data="{}", at=T0) > seqs[3]  # never reused


def test_concurrent_event_appends_become_visible_in_sequence_order(opener: Opener) -> None:
    """A reader that saw seq N saw every event below it: no late commit behind its back."""
    a, b, reader = opener(), opener(), opener()
    start = reader.last_event_seq()
    seen: list[int] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def write(store: SqlStore, origin: str) -> None:
        try:
            for n in range(40):
                store.append_event(origin=origin, kind="k", data=str(n), at=T0)
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        last = start
        while not done.is_set() or last < reader.last_event_seq():
            for ev in reader.events_after(last):
                seen.append(ev.seq)
                last = ev.seq

    writers = [threading.Thread(target=write, args=(s, o)) for s, o in ((a, "a"), (b, "b"))]
    r = threading.Thread(target=read)
    r.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join(60)
    done.set()
    r.join(60)
    assert errors == []
    assert len(seen) == 80 and seen == sorted(seen)


def test_unresolved_state_survives_a_restart(opener: Opener) -> None:
    first = opener()
    _intent(first, "lost")
    first.mark_ambiguous("lost")
    first.add_freeze(Freeze(id="f1", kind="action_class", pattern="enrichment", reason="r",
                            by="a", created_at=T0), [])
    first.save_approval("a1", "pending", "{}")
    with first.budget_hold(TRIAGE, "enrichment", T0, DAY) as hold:
        hold.take(T0)
    instance = first.instance_id
    first.close()
    again = opener()
    assert again.instance_id == instance  # how the broker finds its own tokens in Vault
    assert _states(again) == {"lost": "ambiguous"}
    assert [f.id for f, _ in again.unenforced_freezes()] == ["f1"]
    assert again.load_approvals() == ["{}"]
    with again.budget_hold(TRIAGE, "enrichment", T0, DAY) as hold:
        assert hold.recent == (T0,)  # a restart does not reset a budget
    assert again.schema_version() == SCHEMA_VERSION


def test_a_mint_whose_intent_was_dropped_is_refused(store: SqlStore) -> None:
    """Reconcile dropped a stale intent while its mint was still under way: recording the
    credential must fail (the caller revokes it) rather than hand out an unknown one."""
    _intent(store, "r-slow")
    store.forget_intent("r-slow")
    with pytest.raises(StoreError, match="no longer pending"):
        store.record_minted(request_id="r-slow", credential_id="acc-slow",
                            expires_at=T0 + timedelta(minutes=2), entity_id="")
    assert store.get("acc-slow") is None
    _live(store, "r-twice", "acc-1")
    with pytest.raises(StoreError):  # a live row is not completed twice
        store.record_minted(request_id="r-twice", credential_id="acc-2",
                            expires_at=T0 + timedelta(minutes=2), entity_id="")


def test_check_passes_on_a_working_store(store: SqlStore) -> None:
    store.check()


# -- budgets


def test_a_budget_counts_takes_and_gives_back(store: SqlStore) -> None:
    with store.budget_hold(TRIAGE, "enrichment", T0, DAY) as hold:
        assert hold.recent == ()
        hold.take(T0)
    t1 = T0 + timedelta(seconds=1)
    with store.budget_hold(TRIAGE, "enrichment", t1, DAY) as hold:
        assert hold.recent == (T0,)
        hold.take(t1)
    with store.budget_hold(TRIAGE, "containment", t1, DAY) as hold:
        assert hold.recent == ()  # per (identity, class)
    with store.budget_hold(OTHER, "enrichment", t1, DAY) as hold:
        assert hold.recent == ()
    store.give_back(TRIAGE, "enrichment", t1)
    store.give_back(TRIAGE, "enrichment", t1)  # only what was taken is given back
    with store.budget_hold(TRIAGE, "enrichment", t1, DAY) as hold:
        assert hold.recent == (T0,)
    later = T0 + DAY  # out of the horizon: not counted, and dropped
    with store.budget_hold(TRIAGE, "enrichment", later, DAY) as hold:
        assert hold.recent == ()


def test_a_slot_taken_in_a_failed_decision_is_not_counted(store: SqlStore) -> None:
    with pytest.raises(RuntimeError), store.budget_hold(TRIAGE, "enrichment", T0, DAY) as hold:
        hold.take(T0)
        raise RuntimeError("the decision failed")
    with store.budget_hold(TRIAGE, "enrichment", T0, DAY) as hold:
        assert hold.recent == ()


def test_a_budget_hold_blocks_the_same_budget_in_another_broker(opener: Opener) -> None:
    a, b = opener(), opener()
    entered = threading.Event()
    with a.budget_hold(TRIAGE, "enrichment", T0, DAY) as hold:
        hold.take(T0)

        def other() -> None:
            with b.budget_hold(TRIAGE, "enrichment", T0, DAY) as theirs:
                assert theirs.recent == (T0,)  # sees the slot taken before it got the hold
                entered.set()

        t = threading.Thread(target=other)
        t.start()
        assert not entered.wait(0.3)  # waits for this decision
    assert entered.wait(10)
    t.join()


def test_a_budget_is_never_exceeded_by_concurrent_brokers(opener: Opener) -> None:
    """Two stores (two brokers) on one database, 8 threads each racing for a budget of 5."""
    stores = [opener(), opener()]
    limit, taken, errors = 5, [], []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def decide(store: SqlStore, n: int) -> None:
        start.wait()
        try:
            now = T0 + timedelta(microseconds=n)
            with store.budget_hold(TRIAGE, "enrichment", now, DAY) as hold:
                if len(hold.recent) < limit:
                    hold.take(now)
                    with lock:
                        taken.append(n)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=decide, args=(stores[i % 2], i)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(taken) == limit
    with stores[0].budget_hold(TRIAGE, "enrichment", T0 + timedelta(seconds=1), DAY) as hold:
        assert len(hold.recent) == limit


def test_a_slot_taken_by_a_decision_with_a_later_clock_is_counted(store: SqlStore) -> None:
    """Two replicas' clocks (or two decisions that read the clock before the hold) disagree:
    a slot stamped after this decision's now is spent all the same."""
    from broker.app.budget import StoreBudget

    usage, key, later = StoreBudget(store), (TRIAGE, "enrichment"), T0 + timedelta(seconds=2)
    with usage.spend(key, later, lambda recent: (recent, True)):
        pass
    with usage.spend(key, T0, lambda recent: (recent, False)) as recent:
        assert recent == (T0,)  # counted (as now), so a budget of 1 is spent


def test_each_credential_keeps_its_environment(store: SqlStore) -> None:
    """Revocation, reconcile and freezes go to the Vault the row names."""
    store.record_intent(request_id="r-s", spiffe_id=TRIAGE, action_class="enrichment",
                        target="t", event_source="", event_id="", at=T0,
                        environment="sandbox")
    store.record_minted(request_id="r-s", credential_id="acc-s",
                        expires_at=T0 + timedelta(minutes=2), entity_id="ent-s")
    _live(store, "r-d", "acc-d", entity="ent-d")  # a broker without environments: ''
    row = store.get("acc-s")
    assert row is not None and row.environment == "sandbox"
    assert [r.environment for r in store.live(Selector.build(all=True), T0)] == ["sandbox", ""]
    assert store.entity_ids(Selector.build(spiffe_id=TRIAGE)) == {"sandbox#ent-s": TRIAGE,
                                                                  "ent-d": TRIAGE}
