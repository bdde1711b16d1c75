"""Gossip wire format: round trips, packet-size splitting, and rejection of garbage."""

from __future__ import annotations

import itertools

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pico.gossip import (
    DigestEntry,
    Entry,
    GossipDecodeError,
    GossipRejected,
    NodeDelta,
    codec,
    frame,
    frame_length,
)
from pico.gossip.state import GossipState


def entries(node: str, count: int, start: int = 1) -> tuple[Entry, ...]:
    return tuple(Entry(f"endpoint:{node}-{i}", str(i), start + i) for i in range(count))


def test_digest_round_trip() -> None:
    digest = [DigestEntry("a", "a:1", 3, False), DigestEntry("b", "b:1", 2**64 - 1, True)]
    data = codec.encode_digest("a", "a:1", True, digest, 1400)
    assert data[:2] == b"\x01\x00"
    assert codec.decode_datagram(data) == codec.Digest("a", "a:1", True, tuple(digest))


def test_digest_is_truncated_to_the_packet_size() -> None:
    digest = [DigestEntry(f"node-{i:03d}", f"10.0.0.{i}:7946", i, False) for i in range(200)]
    data = codec.encode_digest("a", "a:1", False, digest, 1400)
    assert len(data) <= 1400
    decoded = codec.decode_datagram(data)
    assert isinstance(decoded, codec.Digest)
    assert 0 < len(decoded.entries) < 200
    assert list(decoded.entries) == digest[: len(decoded.entries)]


def test_delta_with_several_nodes_decodes_each_node_separately() -> None:
    nodes = [NodeDelta(n, f"{n}:1", entries(n, 3), since=0) for n in ("a", "b", "c")]
    (data,) = codec.encode_delta("x", "x:1", nodes, 1400, 16)
    assert data[:2] == b"\x02\x00"
    assert codec.decode_datagram(data) == codec.Delta("x", "x:1", tuple(nodes))


def test_empty_delta_is_one_packet_with_just_the_header() -> None:
    (data,) = codec.encode_delta("x", "x:1", [], 1400, 16)
    assert codec.decode_datagram(data) == codec.Delta("x", "x:1", ())


def test_large_delta_is_split_into_packets_that_chain_by_version() -> None:
    nodes = [NodeDelta(n, f"{n}:1", entries(n, 40), since=0) for n in ("a", "b")]
    packets = codec.encode_delta("x", "x:1", nodes, 600, 100)
    assert len(packets) > 4
    assert all(len(p) <= 600 for p in packets)
    chunks = [n for p in packets for n in _delta(p).nodes]
    for node in nodes:
        mine = [c for c in chunks if c.id == node.id]
        assert tuple(e for c in mine for e in c.entries) == node.entries
        # Each chunk continues from the last version of the previous one.
        assert mine[0].since == 0
        for prev, nxt in itertools.pairwise(mine):
            assert nxt.since == prev.entries[-1].version


def test_split_delta_applied_out_of_order_never_leaves_a_gap() -> None:
    node = NodeDelta("a", "a:1", entries("a", 30), since=0)
    packets = codec.encode_delta("x", "x:1", [node], 500, 100)
    receiver = GossipState("r", "r:1")
    for packet in reversed(packets):
        receiver.apply_delta(_delta(packet).nodes, 0.0)
    state = receiver.node_state("a")
    held = {e.version for e in state.entries} if state is not None else set()
    assert held == set(range(1, state.version + 1)) if state is not None else True
    for packet in packets:  # the next round delivers them in order
        receiver.apply_delta(_delta(packet).nodes, 0.0)
    state = receiver.node_state("a")
    assert state is not None and len(state.entries) == 30


def test_delta_packet_count_is_capped() -> None:
    nodes = [NodeDelta("a", "a:1", entries("a", 200), since=0)]
    assert len(codec.encode_delta("x", "x:1", nodes, 600, 3)) == 3


def test_seed_format_delta_without_entry_count_reads_to_the_end() -> None:
    data = (
        b"\x02\x00"
        + msgpack.packb({"node_id": "x", "addr": "x:1"})
        + msgpack.packb({"node_id": "a", "addr": "a:1"})
        + msgpack.packb(
            {"key": "k", "value": "v", "version": 1, "internal": False, "deleted": False}
        )
    )
    delta = _delta(data)
    assert delta.nodes == (NodeDelta("a", "a:1", (Entry("k", "v", 1),), None),)


def test_join_and_leave_round_trips() -> None:
    nodes = [NodeDelta("a", "a:1", entries("a", 2))]
    digest = [DigestEntry("a", "a:1", 2, False)]
    join = codec.encode_join("a", "a:1", nodes, digest)
    assert codec.decode_join(join) == codec.Join("a", "a:1", tuple(nodes), tuple(digest))
    reply = codec.encode_join_reply("b", "b:1", nodes)
    assert codec.decode_join(reply) == codec.Join("b", "b:1", tuple(nodes), ())
    leave = codec.encode_leave("a", "a:1", nodes)
    assert codec.decode_leave(leave) == codec.Leave("a", "a:1", tuple(nodes))
    assert codec.decode_leave(codec.encode_leave_ack("b", "b:1")) == codec.Leave("b", "b:1", ())


def test_a_frame_announces_its_length_and_one_over_the_limit_is_refused() -> None:
    join = codec.encode_join("a", "a:1", [NodeDelta("a", "a:1", entries("a", 5))], [])
    framed = frame(join)
    assert framed[4:] == join
    assert frame_length(framed[:4], max_size=len(join)) == len(join)
    with pytest.raises(GossipRejected) as refused:
        frame_length(framed[:4], max_size=len(join) - 1)
    assert refused.value.reason == "join_size"
    with pytest.raises(GossipDecodeError):
        frame_length(b"\x00\x00\x00\x00", max_size=1 << 20)  # nothing to decode


def test_incarnations_round_trip_and_default_to_zero_when_absent() -> None:
    digest = [DigestEntry("b", "b:1", 3, False, incarnation=2**64 - 1)]
    data = codec.encode_digest("a", "a:1", True, digest, 1400, incarnation=7)
    assert codec.decode_datagram(data) == codec.Digest("a", "a:1", True, tuple(digest), 7)
    node = NodeDelta("b", "b:1", entries("b", 2), since=0, incarnation=9)
    (packet,) = codec.encode_delta("a", "a:1", [node], 1400, 1, incarnation=7)
    assert codec.decode_datagram(packet) == codec.Delta("a", "a:1", (node,), 7)
    join = codec.encode_join("a", "a:1", [node], digest, incarnation=7)
    tcp = NodeDelta("b", "b:1", node.entries, None, 9)
    assert codec.decode_join(join) == codec.Join("a", "a:1", (tcp,), tuple(digest), 7)
    old = b"\x01\x00" + msgpack.packb({"node_id": "a", "addr": "a:1", "request": False})
    old += msgpack.packb({"id": "b", "addr": "b:1", "version": 1, "left": False})
    assert codec.decode_datagram(old) == codec.Digest(
        "a", "a:1", False, (DigestEntry("b", "b:1", 1, False, 0),), 0
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01",
        b"\x01\x00",
        b"\x01\x01" + msgpack.packb({"node_id": "a", "addr": "a:1"}),  # wrong version
        b"\x09\x00" + msgpack.packb({"node_id": "a", "addr": "a:1"}),  # unknown type
        b"\x03\x00" + msgpack.packb({"node_id": "a", "addr": "a:1"}),  # TCP type over UDP
        b"\x01\x00" + msgpack.packb({"node_id": "a", "addr": "a:1", "request": True})[:-2],
        b"\x01\x00" + msgpack.packb([1, 2, 3]),
        b"\x01\x00" + msgpack.packb({"node_id": 5, "addr": "a:1"}),
        b"\x01\x00" + msgpack.packb({"node_id": "a", "addr": "a:1", "request": "yes"}),
        b"\x01\x00" + msgpack.packb({"node_id": "a", "addr": "a:1"}) + msgpack.packb({"id": "b"}),
        b"\x02\x00"
        + msgpack.packb({"node_id": "a", "addr": "a:1"})
        + msgpack.packb({"node_id": "b", "addr": "b:1", "entries": 1})
        + msgpack.packb({"key": "k", "value": "v", "version": True}),
        b"\x02\x00" + msgpack.packb({"node_id": "a", "addr": "a:1", 1: 2}),
        b"\x02\x00" + b"\xc1",  # reserved msgpack byte
        b"\x02\x00" + b"\xdd\xff\xff\xff\xff",  # array claiming 4G items
        b"\x02\x00" + b"\xd9\x05\xff\xfe\xfd\xfc\xfb",  # invalid utf-8 string
        b"\x02\x00" + b"\x91" * 5000,  # deep nesting
    ],
)
def test_garbage_datagrams_raise_decode_error(data: bytes) -> None:
    with pytest.raises(GossipDecodeError):
        codec.decode_datagram(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_decode_error(data: bytes) -> None:
    for decode in (codec.decode_datagram, codec.decode_join, codec.decode_leave):
        try:
            decode(data)
        except GossipDecodeError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100), st.sampled_from([b"\x01\x00", b"\x02\x00", b"\x03\x00"]))
def test_random_payload_behind_a_valid_prefix_only_raises_decode_error(
    payload: bytes, prefix: bytes
) -> None:
    try:
        codec.decode_datagram(prefix + payload)
    except GossipDecodeError:
        pass
    for decode in (codec.decode_join, codec.decode_leave):
        try:
            decode(prefix + payload)
        except GossipDecodeError:
            pass
    try:
        frame_length(payload[:4].ljust(4, b"\x00"), max_size=1 << 20)
    except GossipDecodeError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=12),
            st.lists(st.tuples(st.text(max_size=20), st.text(max_size=30)), max_size=30),
        ),
        max_size=6,
    ),
    st.integers(min_value=512, max_value=1400),  # GossipConfig minimum,
)
def test_any_delta_survives_splitting(
    spec: list[tuple[str, list[tuple[str, str]]]], max_packet_size: int
) -> None:
    nodes = [
        NodeDelta(
            node_id,
            f"{node_id}:1",
            tuple(Entry(k, v, i + 1) for i, (k, v) in enumerate(kvs)),
            since=0,
        )
        for node_id, kvs in spec
        if kvs
    ]
    packets = codec.encode_delta("x", "x:1", nodes, max_packet_size, 10_000)
    assert all(len(p) <= max_packet_size for p in packets)
    got: dict[tuple[int, str], list[Entry]] = {}
    for packet in packets:
        for chunk in _delta(packet).nodes:
            got.setdefault((_index(nodes, chunk, got), chunk.id), []).extend(chunk.entries)
    sent = [e for n in nodes for e in n.entries]
    received = [e for chunks in got.values() for e in chunks]
    assert sorted(received, key=repr) == sorted(sent, key=repr)


def _index(
    nodes: list[NodeDelta], chunk: NodeDelta, got: dict[tuple[int, str], list[Entry]]
) -> int:
    # Node ids may repeat in generated data; match a chunk to the node that owns its entries.
    for i, node in enumerate(nodes):
        if node.id == chunk.id and chunk.entries and chunk.entries[0] in node.entries:
            return i
    return -1


def _delta(data: bytes) -> codec.Delta:
    decoded = codec.decode_datagram(data)
    assert isinstance(decoded, codec.Delta)
    return decoded
