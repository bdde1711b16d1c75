"""Property-based specification of the mux Session (hypothesis)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pico.mux.frame import ResetReason
from pico.mux.session import (
    ConnectionTerminated,
    DataReceived,
    Event,
    Session,
    StreamClosed,
    StreamOpened,
)

PATTERN = bytes(range(251)) * 64
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pattern(offset: int, n: int) -> bytes:
    """Deterministic, position-dependent bytes so reordering or loss is detectable."""
    start = offset % 251
    return PATTERN[start : start + n]


def assert_windows_non_negative(session: Session) -> None:
    for stream in session._streams.values():
        assert stream.send_window >= 0
        assert stream.recv_avail >= 0
        assert stream.unconsumed >= 0


# --------------------------------------------------------------------------- (1) splitting

client_ops = st.lists(
    st.one_of(
        st.tuples(st.just("open")),
        st.tuples(st.just("send"), st.integers(0, 3), st.integers(1, 3000)),
        st.tuples(st.just("end"), st.integers(0, 3)),
        st.tuples(st.just("reset"), st.integers(0, 3), st.sampled_from(list(ResetReason))),
        st.tuples(st.just("ping")),
        st.tuples(st.just("flush")),
    ),
    max_size=30,
)


def record_client_output(ops: list[tuple[object, ...]]) -> list[bytes]:
    """Run ops on a client session; return its output as the chunks data_to_send produced."""
    client = Session(client=True, initial_window=4096)
    streams: list[int] = []
    chunks: list[bytes] = []
    offset = 0
    for op in ops:
        kind = op[0]
        if kind == "open":
            streams.append(client.open_stream())
        elif kind == "ping":
            client.send_ping()
        elif kind == "flush":
            chunks.append(client.data_to_send())
        elif streams:
            sid = streams[int(op[1]) % len(streams)]  # type: ignore[call-overload]
            if sid not in client.stream_ids():
                continue
            if kind == "send":
                n = int(op[2])  # type: ignore[call-overload]
                try:
                    client.send(sid, pattern(offset, n))
                except Exception:
                    continue
                offset += n
            elif kind == "end":
                client.end_stream(sid)
            elif kind == "reset":
                client.reset_stream(sid, op[2])  # type: ignore[arg-type]
    chunks.append(client.data_to_send())
    return [c for c in chunks if c]


def deliver(chunks: list[bytes]) -> tuple[list[Event], bytes]:
    server = Session(client=False, initial_window=4096)
    events: list[Event] = []
    out = bytearray()
    for chunk in chunks:
        server.receive_data(chunk)
        events += server.events_received()
        out += server.data_to_send()
    return events, bytes(out)


def normalise(events: list[Event]) -> list[Event]:
    """Merge adjacent DataReceived of the same stream (frame boundaries may differ)."""
    merged: list[Event] = []
    for event in events:
        last = merged[-1] if merged else None
        if (
            isinstance(event, DataReceived)
            and isinstance(last, DataReceived)
            and last.stream_id == event.stream_id
        ):
            merged[-1] = DataReceived(event.stream_id, memoryview(bytes(last.data) + event.data))
        else:
            merged.append(event)
    return merged


@FAST
@given(
    ops=client_ops, cuts=st.lists(st.integers(0, 100_000), max_size=40), junk=st.binary(max_size=20)
)
def test_arbitrary_splitting_and_coalescing_yields_identical_events(
    ops: list[tuple[object, ...]], cuts: list[int], junk: bytes
) -> None:
    chunks = record_client_output(ops)
    whole = b"".join(chunks) + junk
    reference_events, reference_out = deliver([whole])

    positions = sorted({c % (len(whole) + 1) for c in cuts} | {0, len(whole)})
    split = [whole[a:b] for a, b in itertools.pairwise(positions)]
    for variant in (split, [*chunks, junk], [bytes([b]) for b in whole[:400]] + [whole[400:]]):
        events, out = deliver(variant)
        assert normalise(events) == normalise(reference_events)
        assert out == reference_out


# --------------------------------------------------------------------------- (2) interleavings


@dataclass
class Side:
    session: Session
    sent: dict[int, bytearray] = field(default_factory=dict)
    received: dict[int, bytearray] = field(default_factory=dict)
    unconsumed: dict[int, int] = field(default_factory=dict)

    def take_events(self) -> None:
        for event in self.session.events_received():
            assert not isinstance(event, ConnectionTerminated), event
            if isinstance(event, DataReceived):
                self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
                self.unconsumed[event.stream_id] = self.unconsumed.get(event.stream_id, 0) + len(
                    event.data
                )


def transfer(src: Side, dst: Side) -> bool:
    data = src.session.data_to_send()
    if data:
        dst.session.receive_data(data)
    dst.take_events()
    return bool(data)


interleaving_ops = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from(["send"]), st.booleans(), st.integers(0, 3), st.integers(1, 6000)
        ),
        st.tuples(
            st.sampled_from(["consume"]), st.booleans(), st.integers(0, 3), st.integers(1, 8000)
        ),
        st.tuples(st.sampled_from(["deliver"]), st.booleans(), st.just(0), st.just(0)),
    ),
    max_size=60,
)


@FAST
@given(
    ops=interleaving_ops,
    window=st.sampled_from([1024, 3000, 8192]),
    growth=st.sampled_from([1, 4]),
)
def test_random_send_consume_interleavings_keep_windows_valid_and_deliver_everything(
    ops: list[tuple[str, bool, int, int]], window: int, growth: int
) -> None:
    client = Side(Session(client=True, initial_window=window, max_window=window * growth))
    server = Side(Session(client=False, initial_window=window, max_window=window * growth))
    stream_ids = [client.session.open_stream() for _ in range(4)]
    transfer(client, server)
    transfer(server, client)

    for kind, from_client, index, n in ops:
        me, peer = (client, server) if from_client else (server, client)
        sid = stream_ids[index]
        if kind == "send":
            sent = me.sent.setdefault(sid, bytearray())
            chunk = pattern(len(sent) + sid, n)
            me.session.send(sid, chunk)
            sent += chunk
        elif kind == "consume":
            k = min(n, me.unconsumed.get(sid, 0))
            me.unconsumed[sid] = me.unconsumed.get(sid, 0) - k
            me.session.consume(sid, k)
        else:
            transfer(me, peer)
        assert_windows_non_negative(client.session)
        assert_windows_non_negative(server.session)

    # Drain: both readers now consume everything they get.
    for _ in range(10_000):
        for me in (client, server):
            for sid, k in me.unconsumed.items():
                me.session.consume(sid, k)
            me.unconsumed = {}
        moved = transfer(client, server)
        moved = transfer(server, client) or moved
        assert_windows_non_negative(client.session)
        assert_windows_non_negative(server.session)
        if (
            not moved
            and not any(client.unconsumed.values())
            and not any(server.unconsumed.values())
        ):
            break
    assert not any(s.session.buffered(sid) for s in (client, server) for sid in stream_ids)
    for src, dst in ((client, server), (server, client)):
        for sid in stream_ids:
            assert bytes(dst.received.get(sid, b"")) == bytes(src.sent.get(sid, b""))


# --------------------------------------------------------------------------- (3) stalls


@FAST
@given(
    window=st.integers(256, 8192),
    stalled_bytes=st.integers(1, 40_000),
    flowing_sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=15),
    stalled_first=st.booleans(),
)
def test_a_stalled_stream_never_blocks_another_stream(
    window: int, stalled_bytes: int, flowing_sizes: list[int], stalled_first: bool
) -> None:
    client = Session(client=True, initial_window=window)
    server = Session(client=False, initial_window=window)
    a = client.open_stream()
    b = client.open_stream()
    stalled, flowing = (a, b) if stalled_first else (b, a)
    client.send(stalled, pattern(0, min(stalled_bytes, 10_000)))
    if stalled_bytes > 10_000:
        client.send(stalled, b"s" * (stalled_bytes - 10_000))

    got: dict[int, int] = {stalled: 0, flowing: 0}
    flowing_data = bytearray()
    opened: list[int] = []
    for size in flowing_sizes:
        chunk = pattern(len(flowing_data), size)
        client.send(flowing, chunk)
        flowing_data += chunk
        for _ in range(100):  # pump until quiet, consuming only the flowing stream
            data = client.data_to_send()
            if data:
                server.receive_data(data)
            for event in server.events_received():
                assert not isinstance(event, ConnectionTerminated | StreamClosed)
                if isinstance(event, StreamOpened):
                    opened.append(event.stream_id)
                if isinstance(event, DataReceived):
                    got[event.stream_id] += len(event.data)
                    if event.stream_id == flowing:
                        server.consume(flowing, len(event.data))
            back = server.data_to_send()
            if back:
                client.receive_data(back)
            elif not data:
                break
        assert client.buffered(flowing) == 0
        assert got[flowing] == len(flowing_data)
    assert sorted(opened) == [a, b]
    assert got[stalled] == min(window, stalled_bytes)
    assert client.buffered(stalled) == stalled_bytes - min(window, stalled_bytes)
