"""GossipState: versioning, digests and deltas, apply rules, leave, compaction, expiry."""

from __future__ import annotations

from pico.gossip import (
    COMPACT_KEY,
    LEFT_KEY,
    DigestEntry,
    Entry,
    GossipState,
    NodeDelta,
    NodeExpired,
    NodeJoined,
    NodeKeyDeleted,
    NodeLeft,
    NodeUnreachable,
    NodeUpdated,
)


def values(state: GossipState, node_id: str) -> dict[str, str]:
    node = state.node_state(node_id)
    assert node is not None
    return {e.key: e.value for e in node.entries if not e.deleted and not e.internal}


def sync(src: GossipState, dst: GossipState, now: float = 0.0) -> None:
    """One anti-entropy exchange: src's digest to dst, then dst's digest answered by src's delta."""
    dst.apply_digest(src.digest(), now)
    dst.apply_delta(src.delta(dst.digest()), now)


def test_local_upserts_and_deletes_bump_the_version() -> None:
    s = GossipState("a", "a:1")
    s.upsert("k", "1")
    s.upsert("k", "1")  # unchanged: no-op
    s.upsert("k", "2")
    s.delete("k")
    s.delete("k")  # already deleted: no-op
    s.delete("missing")  # missing: no-op
    node = s.node_state("a")
    assert node is not None
    assert node.version == 3
    assert node.entries == (Entry("k", "", 3, False, True),)


def test_upsert_after_delete_revives_the_key() -> None:
    s = GossipState("a", "a:1")
    s.upsert("k", "1")
    s.delete("k")
    s.upsert("k", "1")
    assert values(s, "a") == {"k": "1"}


def test_digest_lists_the_local_node_first() -> None:
    s = GossipState("a", "a:1")
    s.upsert("k", "v")
    s.apply_digest([DigestEntry("b", "b:1", 5, False)], 0.0)
    assert s.digest() == [DigestEntry("a", "a:1", 1, False), DigestEntry("b", "b:1", 0, False)]


def test_delta_holds_only_entries_newer_than_the_digest_sorted_by_version() -> None:
    s = GossipState("a", "a:1")
    for key in ("x", "y", "z"):
        s.upsert(key, "1")
    s.upsert("x", "2")
    (delta,) = s.delta([DigestEntry("a", "a:1", 1, False)])
    assert delta.since == 1
    assert [(e.key, e.version) for e in delta.entries] == [("y", 2), ("z", 3), ("x", 4)]
    assert s.delta([DigestEntry("a", "a:1", 4, False)]) == []
    assert s.delta([DigestEntry("unknown", "u:1", 0, False)]) == []


def test_applying_a_delta_adds_the_node_and_reports_updates_and_deletes() -> None:
    a, b = GossipState("a", "a:1"), GossipState("b", "b:1")
    a.upsert("endpoint:x", "1")
    a.upsert("endpoint:y", "2")
    sync(a, b)
    assert b.drain_events() == [
        NodeJoined("a", "a:1"),
        NodeUpdated("a", "endpoint:x", "1"),
        NodeUpdated("a", "endpoint:y", "2"),
    ]
    a.delete("endpoint:x")
    a.upsert("endpoint:y", "3")
    sync(a, b)
    assert b.drain_events() == [
        NodeKeyDeleted("a", "endpoint:x"),
        NodeUpdated("a", "endpoint:y", "3"),
    ]
    assert values(b, "a") == {"endpoint:y": "3"}


def test_entries_at_or_below_the_known_version_are_skipped() -> None:
    b = GossipState("b", "b:1")
    b.apply_delta([NodeDelta("a", "a:1", (Entry("k", "new", 5),))], 0.0)
    b.apply_delta([NodeDelta("a", "a:1", (Entry("k", "old", 3),))], 0.0)
    assert values(b, "a") == {"k": "new"}


def test_a_chunk_that_would_leave_a_gap_is_ignored() -> None:
    b = GossipState("b", "b:1")
    b.apply_delta([NodeDelta("a", "a:1", (Entry("k1", "1", 1),), since=0)], 0.0)
    # The chunk covering versions 2-3 was lost; versions 4-5 arrive first.
    b.apply_delta([NodeDelta("a", "a:1", (Entry("k4", "1", 4),), since=3)], 0.0)
    assert values(b, "a") == {"k1": "1"}
    b.apply_delta([NodeDelta("a", "a:1", (Entry("k2", "1", 2), Entry("k3", "1", 3)), since=1)], 0)
    b.apply_delta([NodeDelta("a", "a:1", (Entry("k4", "1", 4),), since=3)], 0.0)
    assert values(b, "a") == {"k1": "1", "k2": "1", "k3": "1", "k4": "1"}


def test_entries_about_ourselves_are_ignored() -> None:
    a = GossipState("a", "a:1")
    a.apply_delta([NodeDelta("a", "a:1", (Entry("k", "forged", 9),))], 0.0)
    assert values(a, "a") == {}


def test_digest_never_adds_left_nodes_and_never_re_adds_known_ones() -> None:
    s = GossipState("a", "a:1")
    s.apply_digest([DigestEntry("b", "b:1", 3, False), DigestEntry("c", "c:1", 3, True)], 0.0)
    s.apply_digest([DigestEntry("b", "b:1", 7, False)], 0.0)
    assert [m.id for m in s.metadata()] == ["a", "b"]
    assert s.drain_events() == [NodeJoined("b", "b:1")]


def test_leave_marks_the_node_left_everywhere_and_it_expires() -> None:
    a, b = GossipState("a", "a:1"), GossipState("b", "b:1", expiry=60.0)
    a.upsert("k", "v")
    a.mark_left()
    assert a.left
    assert (a.node_state("a") or None) is not None
    b.apply_delta([a.local_delta()], 10.0)
    meta = {m.id: m for m in b.metadata()}["a"]
    assert meta.left and meta.expiry == 70.0
    assert NodeLeft("a") in b.drain_events()
    assert b.expire(69.9) == []
    assert b.expire(70.0) == ["a"]
    assert b.drain_events() == [NodeExpired("a")]


def test_unreachable_node_expires_and_is_never_resurrected_by_stale_gossip() -> None:
    b = GossipState("b", "b:1", expiry=60.0)
    b.apply_delta([NodeDelta("dead", "d:1", (Entry("k", "v", 1),), since=0)], 0.0)
    b.mark_unreachable("dead", 5.0)
    assert b.expire(65.0) == ["dead"]
    assert b.drain_events()[-2:] == [NodeUnreachable("dead"), NodeExpired("dead")]
    # A peer that still carries the dead node keeps gossiping about it.
    for now in range(70, 1000, 10):
        b.apply_digest([DigestEntry("dead", "d:1", 1, False)], float(now))
        b.apply_delta([NodeDelta("dead", "d:1", (Entry("k", "v", 2),), since=0)], float(now))
        b.expire(float(now))
    assert not b.knows("dead")
    assert b.drain_events() == []
    # Once nobody has mentioned it for the tombstone TTL (2 x expiry), the id is forgotten.
    b.expire(1000.0 + 120.0)
    assert not b.is_expired("dead")


def test_reachable_again_cancels_the_expiry() -> None:
    b = GossipState("b", "b:1")
    # Known with state: a node only named in a digest is not watched (and has its own expiry).
    b.apply_delta([NodeDelta("a", "a:1", (Entry("k", "v", 1),), since=0)], 0.0)
    b.mark_unreachable("a", 1.0)
    b.mark_reachable("a")
    assert b.expire(1000.0) == []
    assert {m.id: m for m in b.metadata()}["a"].expiry is None


def test_compaction_drops_tombstones_and_peers_follow() -> None:
    a, b = GossipState("a", "a:1", compact_threshold=3), GossipState("b", "b:1")
    a.upsert("keep", "1")
    for i in range(3):
        a.upsert(f"gone{i}", "1")
    sync(a, b)
    assert not a.compact()  # no tombstones yet
    for i in range(3):
        a.delete(f"gone{i}")
    b.drain_events()
    assert a.compact()
    local = a.node_state("a")
    assert local is not None
    assert [(e.key, e.version) for e in local.entries] == [(COMPACT_KEY, 9), ("keep", 8)]
    assert local.entries[0].value == "7"
    # b missed the deletes: compaction still removes the keys there.
    sync(a, b)
    assert values(b, "a") == {"keep": "1"}
    assert sorted(e.key for e in b.drain_events() if isinstance(e, NodeKeyDeleted)) == [
        "gone0",
        "gone1",
        "gone2",
    ]


def test_mark_left_adds_the_internal_left_entry_once() -> None:
    a = GossipState("a", "a:1")
    a.mark_left()
    a.mark_left()
    node = a.node_state("a")
    assert node is not None
    assert [(e.key, e.internal, e.version) for e in node.entries] == [(LEFT_KEY, True, 1)]
