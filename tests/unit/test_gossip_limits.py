"""Bounds on gossip state, incarnations, and replies: what a peer can and cannot make us do.

Each limit is hit once here; what it refused is counted by reason in ``rejections`` (the
``pico_gossip_rejected_total{reason}`` metric).
"""

from __future__ import annotations

import random

import pytest

from pico.gossip import (
    DigestEntry,
    Entry,
    GossipConfig,
    Gossiper,
    GossipState,
    Limits,
    NodeDelta,
    NodeExpired,
    NodeJoined,
    NodeRestarted,
    NodeUpdated,
    Rejections,
    codec,
    newer,
)

SMALL = Limits(
    max_nodes=4,
    max_entries_per_node=8,
    max_key_size=32,
    max_value_size=40,
    max_version_step=100,
)


def state(node_id: str = "me", **kwargs: object) -> GossipState:
    return GossipState(node_id, f"{node_id}:1", limits=SMALL, **kwargs)  # type: ignore[arg-type]


def chunk(node_id: str, *entries: Entry, since: int | None = 0, incarnation: int = 0) -> NodeDelta:
    return NodeDelta(node_id, f"{node_id}:1", entries, since, incarnation)


def values(s: GossipState, node_id: str) -> dict[str, str]:
    node = s.node_state(node_id)
    assert node is not None
    return {e.key: e.value for e in node.entries if not e.deleted and not e.internal}


# -- max_nodes and nodes only heard of ------------------------------------------------------------


def test_a_digest_naming_more_nodes_than_max_nodes_fills_the_table_and_counts_the_rest() -> None:
    s = state()
    s.apply_digest([DigestEntry(f"fake-{i}", "x:1", 3, False) for i in range(10)], 0.0)
    assert len(s.metadata()) == SMALL.max_nodes
    assert s.rejections.counts == {"max_nodes": 10 - (SMALL.max_nodes - 1)}


def test_a_node_that_brings_state_pushes_out_the_oldest_node_only_heard_of() -> None:
    s = state()
    s.apply_digest([DigestEntry(f"fake-{i}", "x:1", 3, False) for i in range(3)], 0.0)
    s.apply_delta([chunk("real", Entry("k", "v", 1))], 1.0)
    assert sorted(m.id for m in s.metadata()) == ["fake-1", "fake-2", "me", "real"]
    assert NodeExpired("fake-0") in s.drain_events()
    # With only nodes that have state, a new one is refused.
    for i in range(2):
        s.apply_delta([chunk(f"real-{i}", Entry("k", "v", 1))], 1.0)
    s.apply_delta([chunk("one-too-many", Entry("k", "v", 1))], 1.0)
    assert not s.knows("one-too-many")
    assert s.rejections.counts["max_nodes"] == 1


def test_nodes_only_heard_of_are_never_contacted_and_are_forgotten_after_expiry() -> None:
    s = state(expiry=60.0)
    s.apply_digest([DigestEntry("named", "victim:1", 3, False)], 0.0)
    assert s.knows("named")
    assert s.remote_ids(live=True) == [] and s.remote_ids(live=False) == []
    assert s.expire(59.9) == []
    assert s.expire(60.0) == ["named"]
    assert s.drain_events() == [NodeJoined("named", "victim:1"), NodeExpired("named")]
    assert not s.is_expired("named")  # no tombstone: it had no state to keep out


def test_a_node_heard_of_that_gets_state_is_kept() -> None:
    s = state(expiry=60.0)
    s.apply_digest([DigestEntry("b", "b:1", 3, False)], 0.0)
    s.apply_delta([chunk("b", Entry("k", "v", 1))], 1.0)
    assert s.expire(1000.0) == []
    assert s.remote_ids(live=True) == ["b"]


def test_a_node_named_at_version_zero_is_not_passed_on() -> None:
    """A peer that names a node it has no state for teaches nothing: made-up ids stop here."""
    s = state()
    s.apply_digest([DigestEntry("fake", "x:1", 0, False)], 0.0)
    assert not s.knows("fake")


# -- sizes, entries and versions ------------------------------------------------------------


@pytest.mark.parametrize(
    ("delta", "reason"),
    [
        (chunk("b", Entry("k" * 33, "v", 1)), "key_size"),
        (chunk("b", Entry("k", "v" * 41, 1)), "value_size"),
        (chunk("b", Entry("k", "é" * 21, 1)), "value_size"),  # 42 bytes of UTF-8
        (chunk("b" * 33, Entry("k", "v", 1)), "key_size"),
        (NodeDelta("b", "x" * 41, (Entry("k", "v", 1),), 0), "value_size"),
        (chunk("b", *(Entry(f"k{i}", "v", i + 1) for i in range(9))), "max_entries"),
        (chunk("b", Entry("k", "v", 101)), "version_step"),
        (chunk("b", Entry("k", "v", 2**64 - 1)), "version_step"),
    ],
)
def test_a_chunk_over_a_limit_is_dropped_whole_and_counted(delta: NodeDelta, reason: str) -> None:
    s = state()
    s.apply_delta([delta, chunk("c", Entry("k", "v", 1))], 0.0)
    assert not s.knows(delta.id)
    assert values(s, "c") == {"k": "v"}  # the rest of the packet stands
    assert s.rejections.counts == {reason: 1}


def test_versions_may_only_move_a_bounded_step_past_what_we_hold() -> None:
    s = state()
    s.apply_delta([chunk("b", Entry("k", "1", 100))], 0.0)
    s.apply_delta([chunk("b", Entry("k", "2", 201), since=None)], 0.0)
    assert values(s, "b") == {"k": "1"}
    s.apply_delta([chunk("b", Entry("k", "3", 200), since=None)], 0.0)
    assert values(s, "b") == {"k": "3"}
    assert s.rejections.counts == {"version_step": 1}


def test_a_compaction_marker_makes_room_for_the_keys_after_it() -> None:
    s = state()
    keys = [Entry(f"k{i}", "v", i + 1) for i in range(8)]
    s.apply_delta([chunk("b", *keys)], 0.0)
    # b dropped four keys and compacted (marker at 12), then added four new ones.
    survivors = [Entry(f"k{i}", "v", 9 + i) for i in range(4)]
    marker = Entry("_internal:compact", "8", 13, internal=True)
    added = [Entry(f"new{i}", "v", 14 + i) for i in range(3)]
    s.apply_delta([chunk("b", *survivors, marker, *added, since=8)], 0.0)
    assert sorted(values(s, "b")) == ["k0", "k1", "k2", "k3", "new0", "new1", "new2"]
    assert s.rejections.counts == {}


def test_the_local_node_publishes_no_more_entries_than_peers_accept() -> None:
    s = state(compact_threshold=100)
    for i in range(SMALL.max_entries_per_node - 2):
        s.upsert(f"k{i}", "v")
    with pytest.raises(ValueError, match="max_entries_per_node"):
        s.upsert("one-more", "v")
    s.delete("k0")
    s.upsert("one-more", "v")  # the tombstone was compacted away to make room
    assert "one-more" in values(s, "me")


def test_a_gossiper_refuses_to_publish_keys_and_values_peers_would_refuse() -> None:
    g = Gossiper("me", "me:1", GossipConfig(max_key_size=32, max_value_size=40))
    with pytest.raises(ValueError, match="max_key_size"):
        g.upsert("k" * 33, "v")
    with pytest.raises(ValueError, match="max_value_size"):
        g.upsert("k", "v" * 41)


def test_a_node_whose_versions_reach_the_step_starts_a_new_incarnation_peers_take() -> None:
    a, b = state("a", incarnation=5), state("b")
    for i in range(SMALL.max_version_step + 1):
        a.upsert("k", str(i))
    node = a.node_state("a")
    assert node is not None and node.version == 1 and a.incarnation == 6
    # A peer that never heard of a takes its whole state, a step of one version.
    b.apply_delta(a.delta([DigestEntry("a", "a:1", 0, False, 0)]), 0.0)
    assert values(b, "a") == {"k": str(SMALL.max_version_step)}
    assert b.rejections.counts == {}


# -- incarnations ----------------------------------------------------------------------------------


def test_incarnations_compare_as_serial_numbers_so_none_is_the_largest() -> None:
    assert newer(2, 1) and not newer(1, 2) and not newer(1, 1)
    assert newer(0, 2**64 - 1)  # one more than the largest uint64 wraps, and is newer
    assert newer(2**63 - 1, 0) and not newer(2**63 + 1, 0)


def test_a_newer_incarnation_replaces_everything_known_about_the_node_at_once() -> None:
    s = state()
    old = [Entry("proxy_addr", "b:8000", 1), Entry("endpoint:old", "1", 2)]
    s.apply_delta([chunk("b", *old, incarnation=1)], 0.0)
    s.apply_delta(
        [chunk("b", Entry("_internal:left", "true", 3, internal=True), since=2, incarnation=1)], 1.0
    )
    s.drain_events()
    new = [Entry("proxy_addr", "b:9000", 1), Entry("endpoint:new", "1", 2)]
    s.apply_delta([NodeDelta("b", "b:2", tuple(new), 0, 2)], 2.0)
    assert s.drain_events() == [
        NodeRestarted("b", "b:2"),
        NodeUpdated("b", "proxy_addr", "b:9000"),
        NodeUpdated("b", "endpoint:new", "1"),
    ]
    node = s.node_state("b")
    assert node is not None and not node.left and node.expiry is None and node.addr == "b:2"
    assert values(s, "b") == {"proxy_addr": "b:9000", "endpoint:new": "1"}
    # The old life's gossip, still in flight, is ignored.
    s.apply_delta([chunk("b", Entry("endpoint:old", "2", 9), since=None, incarnation=1)], 3.0)
    assert values(s, "b") == {"proxy_addr": "b:9000", "endpoint:new": "1"}


def test_a_peer_with_an_older_life_of_a_node_gets_all_of_the_current_one() -> None:
    s = state()
    s.apply_delta([chunk("b", Entry("k", "v", 1), Entry("j", "w", 2), incarnation=7)], 0.0)
    (delta,) = s.delta([DigestEntry("b", "b:1", 50, False, 6)])
    assert (delta.since, delta.incarnation, len(delta.entries)) == (0, 7, 2)
    assert s.delta([DigestEntry("b", "b:1", 0, False, 8)]) == []  # the peer is ahead


def test_an_expired_node_comes_back_under_a_newer_incarnation_only() -> None:
    s = state(expiry=60.0)
    s.apply_delta([chunk("b", Entry("k", "v", 1), incarnation=1)], 0.0)
    s.mark_unreachable("b", 0.0)
    s.expire(60.0)
    s.apply_delta([chunk("b", Entry("k", "v", 2), incarnation=1)], 61.0)
    assert not s.knows("b")
    s.apply_delta([chunk("b", Entry("k", "new life", 1), incarnation=2)], 62.0)
    assert values(s, "b") == {"k": "new life"}


def test_a_member_claiming_newer_state_for_our_id_is_refuted_with_a_newer_incarnation() -> None:
    s = state(incarnation=10, refute_every=1.0)
    s.upsert("k", "v")
    s.apply_digest([DigestEntry("me", "me:1", 3, False, 12)], 0.0)  # not from a member
    assert s.incarnation == 10
    s.apply_digest([DigestEntry("me", "me:1", 3, False, 12)], 0.0, refute=True)
    assert s.incarnation == 13
    assert s.rejections.counts == {"refuted": 1}
    # Our own version too high within our life (a forged version reached a peer).
    s.apply_delta([chunk("me", Entry("k", "x", 99), incarnation=13)], 0.5, refute=True)
    assert s.incarnation == 13  # at most one refutation per refute_every
    s.apply_delta([chunk("me", Entry("k", "x", 99), incarnation=13)], 1.5, refute=True)
    assert s.incarnation == 14
    node = s.node_state("me")
    assert node is not None and node.version == 1 and values(s, "me") == {"k": "v"}


# -- replies ---------------------------------------------------------------------------------------


def gossiper(node_id: str) -> Gossiper:
    return Gossiper(node_id, f"{node_id}:7946", GossipConfig(), rng=random.Random(1))


def test_a_reply_to_a_sender_that_is_not_a_member_is_at_most_four_times_its_request() -> None:
    a = gossiper("a")
    for i in range(300):
        a.upsert(f"endpoint:service-{i:03d}", "1")
    request = codec.encode_digest("x", "x:1", True, [DigestEntry("a", "a:7946", 0, False)], 1400)
    replies = a.receive_datagram(request, 0.0, "203.0.113.9:4000")
    assert {r.addr for r in replies} == {"203.0.113.9:4000"}
    assert 0 < sum(len(r.data) for r in replies) <= 4 * len(request)


def test_a_tiny_datagram_gets_no_reply_rather_than_a_larger_one() -> None:
    a = Gossiper("a" * 200, "a:7946", GossipConfig())
    request = codec.encode_digest("x", "", False, [], 1400)
    assert a.receive_datagram(request, 0.0, "203.0.113.9:4000") == []


def test_a_member_at_its_own_address_gets_the_whole_delta() -> None:
    a, b = gossiper("a"), gossiper("b")
    for i in range(300):
        a.upsert(f"endpoint:service-{i:03d}", "1")
    b.handle_join_reply(a.handle_join(b.join_request(0.0), 0.0), 0.0)  # b is now a member of a
    request = codec.encode_digest("b", "b:7946", True, [DigestEntry("a", "a:7946", 0, False)], 1400)
    member = a.receive_datagram(request, 0.0, "b:7946")
    spoofed = a.receive_datagram(request, 0.0, "203.0.113.9:4000")
    assert sum(len(r.data) for r in member) > 10 * len(request)
    assert sum(len(r.data) for r in spoofed) <= 4 * len(request)


# -- warnings --------------------------------------------------------------------------------------


def test_rejections_are_due_a_warning_at_most_once_per_reason_per_minute() -> None:
    r = Rejections()
    for _ in range(1000):
        r.add("max_nodes", "node table full")
    r.add("key_size", "key too long", "node-x")
    first = {w.reason: w.count for w in r.due(0.0)}
    assert first == {"max_nodes": 1000, "key_size": 1}
    r.add("max_nodes", "node table full")
    assert r.due(59.0) == []
    (again,) = r.due(60.0)
    assert (again.reason, again.count) == ("max_nodes", 1)
    assert r.due(200.0) == []  # nothing new
    assert r.counts == {"max_nodes": 1001, "key_size": 1}
