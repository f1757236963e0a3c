"""The revocation bus wakes coroutines from threads; budget holds are per (identity, class)."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

from broker.responder import MAX_STREAMS_PER_IDENTITY, BusEvent, RevocationBus
from broker.service import UsageTracker

A = "spiffe://example.org/agent/a"
B = "spiffe://example.org/fleet/b"


def test_events_published_from_threads_reach_the_right_streams() -> None:
    async def scenario() -> None:
        bus = RevocationBus()
        a, b = bus.subscribe(A), bus.subscribe(B)
        assert a is not None and b is not None and bus.streams == 2

        def publish() -> None:
            bus.publish(BusEvent(credential_ids=("c1", "c2")), owners={"c1": A, "c2": B})
            bus.publish(BusEvent(identity_pattern="spiffe://example.org/fleet/*", reason="r"))
            bus.publish(BusEvent(action_class="enrichment"))
            bus.close()

        await asyncio.to_thread(publish)
        got_a = [await a.queue.get() for _ in range(3)]
        got_b = [await b.queue.get() for _ in range(4)]
        assert got_a[0] == BusEvent(credential_ids=("c1",))
        assert got_a[1:] == [BusEvent(action_class="enrichment"), None]
        assert got_b[0] == BusEvent(credential_ids=("c2",))
        assert got_b[1].identity_pattern and got_b[2].action_class and got_b[3] is None
        bus.unsubscribe(a.id)
        bus.unsubscribe(b.id)
        assert bus.streams == 0

    asyncio.run(scenario())


def test_one_identity_holds_at_most_its_share_of_streams() -> None:
    async def scenario() -> None:
        bus = RevocationBus()
        subs = [bus.subscribe(A) for _ in range(MAX_STREAMS_PER_IDENTITY)]
        assert all(subs) and bus.subscribe(A) is None
        assert bus.subscribe(B) is not None  # others are not affected
        first = subs[0]
        assert first is not None
        bus.unsubscribe(first.id)
        assert bus.subscribe(A) is not None

    asyncio.run(scenario())


def test_a_budget_hold_blocks_only_its_own_identity_and_class() -> None:
    usage = UsageTracker()
    now = datetime(2026, 11, 28, tzinfo=UTC)
    other_done = threading.Event()
    same_done = threading.Event()

    def reserve(key: tuple[str, str], done: threading.Event) -> None:
        with usage.reserve(key, now):
            done.set()

    with usage.reserve((A, "enrichment"), now) as recent:
        assert recent == ()
        usage.record((A, "enrichment"), now)
        threading.Thread(target=reserve, args=((B, "enrichment"), other_done)).start()
        threading.Thread(target=reserve, args=((A, "enrichment"), same_done)).start()
        assert other_done.wait(5)  # another identity decides meanwhile
        assert not same_done.wait(0.2)  # the same key waits for this decision
    assert same_done.wait(5)
    with usage.reserve((A, "enrichment"), now) as recent:
        assert recent == (now,)
    usage.forget((A, "enrichment"), now)
    with usage.reserve((A, "enrichment"), now) as recent:
        assert recent == ()
