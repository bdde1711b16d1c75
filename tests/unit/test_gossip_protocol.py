"""Gossiper: what one round sends, how datagrams are answered, and local API rules."""

from __future__ import annotations

import random

import pytest

from pico.gossip import (
    GossipConfig,
    GossipDecodeError,
    Gossiper,
    NodeJoined,
    NodeReachable,
    NodeUnreachable,
    NodeUpdated,
    codec,
)

CONFIG = GossipConfig(interval=0.1)


def make(node_id: str, seed: int = 0) -> Gossiper:
    return Gossiper(node_id, f"{node_id}:7946", CONFIG, rng=random.Random(seed))


def test_alone_a_tick_sends_nothing() -> None:
    assert make("a").tick(0.0) == []


def test_tick_sends_a_requesting_digest_to_a_live_and_an_unreachable_node() -> None:
    a, b, c = make("a"), make("b"), make("c")
    for peer in (b, c):
        a.handle_join_reply(peer.handle_join(a.join_request(0.0), 0.0), 0.0)
    # c stays silent long enough to be suspected; b keeps answering.
    now = 0.0
    while not any(m.unreachable for m in a.nodes() if m.id == "c"):
        now += 0.1
        for out in a.tick(now):
            if out.addr == "b:7946":
                for reply in b.receive_datagram(out.data, now, a.addr):
                    a.receive_datagram(reply.data, now, b.addr)
        assert now < 30
    sent = a.tick(now + 0.1)
    assert sorted(o.addr for o in sent) == ["b:7946", "c:7946"]
    digest = codec.decode_datagram(sent[0].data)
    assert isinstance(digest, codec.Digest) and digest.request
    assert digest.entries[0].id == "a"


def test_digest_is_answered_with_a_delta_and_our_digest_at_its_source_address() -> None:
    a, b = make("a"), make("b")
    b.upsert("proxy_addr", "b:8000")
    a.upsert("proxy_addr", "a:8000")
    data = codec.encode_digest("a", "a-advertised:1", True, a.digest(), 1400)
    replies = b.receive_datagram(data, 0.0, "10.0.0.1:7946")
    # Never to the address written in the datagram: that would reflect us to anyone named.
    assert [r.addr for r in replies] == ["10.0.0.1:7946", "10.0.0.1:7946"]
    delta, digest = (codec.decode_datagram(r.data) for r in replies)
    assert isinstance(delta, codec.Delta) and delta.nodes == ()  # a knows nothing of b yet
    assert isinstance(digest, codec.Digest) and not digest.request
    # a hears of b from the digest, but only contacts nodes with state (a join, or a delta
    # from a member, brings it): a name in a datagram is not a reason to send anything.
    a.receive_datagram(replies[1].data, 0.0, "b:7946")
    assert NodeJoined("b", "b:7946") in a.events()
    assert a.tick(0.1) == []
    a.handle_join_reply(b.handle_join(a.join_request(0.1), 0.1), 0.1)
    assert NodeUpdated("b", "proxy_addr", "b:8000") in a.events()


def test_any_packet_from_a_suspected_node_makes_it_reachable_again() -> None:
    a, b = make("a"), make("b")
    a.handle_join_reply(b.handle_join(a.join_request(0.0), 0.0), 0.0)
    now = 0.0
    while not [e for e in a.events() if isinstance(e, NodeUnreachable)]:
        now += 0.1
        a.tick(now)
    (empty_delta,) = codec.encode_delta("b", "b:7946", [], 1400, 1)
    a.receive_datagram(empty_delta, now, "b:7946")
    a.tick(now + 0.1)
    assert a.events() == [NodeReachable("b")]


def test_garbage_datagram_raises_decode_error_and_changes_nothing() -> None:
    a = make("a")
    before = a.nodes()
    with pytest.raises(GossipDecodeError):
        a.receive_datagram(b"\x02\x00\xff\xff", 0.0, "x:1")
    with pytest.raises(GossipDecodeError):
        a.handle_join(b"\x03\x00garbage", 0.0)
    assert a.nodes() == before


def test_own_datagrams_are_ignored() -> None:
    a = make("a")
    data = codec.encode_digest("a", "a:7946", True, a.digest(), 1400)
    assert a.receive_datagram(data, 0.0, "a:7946") == []


def test_internal_and_oversized_keys_are_refused() -> None:
    a = make("a")
    with pytest.raises(ValueError):
        a.upsert("_internal:left", "x")
    with pytest.raises(ValueError):
        a.upsert("big", "x" * 2000)


def test_after_leaving_a_node_stops_gossiping() -> None:
    a, b = make("a"), make("b")
    a.handle_join_reply(b.handle_join(a.join_request(0.0), 0.0), 0.0)
    assert a.tick(0.1)
    a.leave_request(0.2)
    assert a.tick(0.3) == []
    assert a.node_state("a") is not None and a.nodes()[0].left


def test_next_tick_delay_adds_up_to_ten_percent_jitter() -> None:
    a = make("a")
    delays = [a.next_tick_delay() for _ in range(100)]
    assert all(0.1 <= d <= 0.11 for d in delays)
    assert len(set(delays)) > 1


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        GossipConfig(interval=0)
    with pytest.raises(ValueError):
        GossipConfig(max_packet_size=100)


def test_push_spreads_a_local_change_without_waiting_for_a_round() -> None:
    a, b, c = make("a"), make("b"), make("c")
    for peer in (b, c):
        a.handle_join_reply(peer.handle_join(a.join_request(0.0), 0.0), 0.0)
    peers = {"b:7946": b, "c:7946": c}
    a.upsert("endpoint:ep", "1")
    pushed = a.push(0.0)
    assert sorted(o.addr for o in pushed) == ["b:7946", "c:7946"]
    # Each peer answers with its digest; a's answer to that carries the new key.
    for out in pushed:
        peer = peers[out.addr]
        for reply in peer.receive_datagram(out.data, 0.0, a.addr):
            for back in a.receive_datagram(reply.data, 0.0, peer.addr):
                peer.receive_datagram(back.data, 0.0, a.addr)
    for peer in (b, c):
        assert NodeUpdated("a", "endpoint:ep", "1") in peer.events()


def test_push_is_silent_alone_and_after_leaving() -> None:
    a, b = make("a"), make("b")
    assert a.push(0.0) == []
    a.handle_join_reply(b.handle_join(a.join_request(0.0), 0.0), 0.0)
    a.leave_request(0.0)
    assert a.push(0.0) == []
