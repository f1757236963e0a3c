"""The revocation bus wakes coroutines from threads; budget holds are per (identity, class)."""

from __future__ import annotations

import asyncio

from broker.app.responder import MAX_STREAMS_PER_IDENTITY, BusEvent, RevocationBus

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


