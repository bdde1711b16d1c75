"""Specification of the sans-I/O mux Session, driven by two sessions wired back to back."""

from __future__ import annotations

import pytest

from pico.mux.frame import Flags, FrameType, GoAwayCode, ResetReason, decode_header, encode_header
from pico.mux.session import (
    DEFAULT_WINDOW,
    MAX_FRAME_PAYLOAD,
    ConnectionTerminated,
    DataReceived,
    Event,
    GoAwayReceived,
    MuxError,
    PongReceived,
    SendWindowAvailable,
    Session,
    StreamClosed,
    StreamEnded,
    StreamOpened,
    StreamReset,
)


def make_pair(**kwargs: int) -> tuple[Session, Session]:
    return Session(client=True, **kwargs), Session(client=False, **kwargs)


def pump(a: Session, b: Session) -> None:
    """Shuttle bytes both ways until neither side has anything left to send."""
    while True:
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.data_to_send()
            if data:
                dst.receive_data(data)
                moved = True
        if not moved:
            return


def received_bytes(events: list[Event], stream_id: int) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


def frames(data: bytes) -> list[tuple[int, ...]]:
    """Split raw output into (version, type, flags, stream_id, length) headers."""
    out = []
    pos = 0
    while pos < len(data):
        hdr = decode_header(data, pos)
        out.append(hdr)
        pos += 12 + (hdr[4] if hdr[1] == FrameType.DATA else 0)
    return out


def open_pair(**kwargs: int) -> tuple[Session, Session, int]:
    client, server = make_pair(**kwargs)
    sid = client.open_stream()
    pump(client, server)
    client.events_received()
    server.events_received()
    return client, server, sid


def terminated(session: Session) -> ConnectionTerminated:
    events = session.events_received()
    assert isinstance(events[-1], ConnectionTerminated), events
    assert session.closed
    out = frames(session.data_to_send())
    assert out[-1] == (0, FrameType.GO_AWAY, 0, 0, GoAwayCode.PROTOCOL_ERROR)
    return events[-1]


# --------------------------------------------------------------------------- opening


def test_client_stream_ids_are_odd_and_server_ids_even() -> None:
    client, server = make_pair()
    assert [client.open_stream() for _ in range(3)] == [1, 3, 5]
    assert [server.open_stream() for _ in range(3)] == [2, 4, 6]


def test_open_stream_sends_window_update_with_syn() -> None:
    client, _ = make_pair()
    sid = client.open_stream()
    assert frames(client.data_to_send()) == [(0, FrameType.WINDOW_UPDATE, Flags.SYN, sid, 0)]


def test_peer_sees_stream_opened_and_core_acks_immediately() -> None:
    client, server = make_pair()
    sid = client.open_stream()
    server.receive_data(client.data_to_send())
    assert server.events_received() == [StreamOpened(sid)]
    assert frames(server.data_to_send()) == [(0, FrameType.WINDOW_UPDATE, Flags.ACK, sid, 0)]
    assert server.stream_ids() == [sid] and server.stream_count == 1


def test_data_with_syn_opens_a_stream_too() -> None:
    _, server = make_pair()
    server.receive_data(encode_header(FrameType.DATA, Flags.SYN, 1, 3) + b"abc")
    assert server.events_received() == [StreamOpened(1), DataReceived(1, b"abc")]


def test_both_sides_can_open_streams_concurrently() -> None:
    client, server = make_pair()
    a = client.open_stream()
    b = server.open_stream()
    pump(client, server)
    assert server.events_received() == [StreamOpened(a)]
    assert client.events_received() == [StreamOpened(b)]
    assert sorted(client.stream_ids()) == sorted(server.stream_ids()) == [1, 2]


# --------------------------------------------------------------------------- data


def test_data_flows_both_ways_in_order() -> None:
    client, server, sid = open_pair()
    client.send(sid, b"hello ")
    client.send(sid, memoryview(b"world"))
    server.send(sid, b"hi back")
    pump(client, server)
    assert received_bytes(server.events_received(), sid) == b"hello world"
    assert received_bytes(client.events_received(), sid) == b"hi back"


def test_large_send_is_split_into_frames_of_at_most_max_frame_payload() -> None:
    # A window big enough for the whole send, so only the frame size limit splits it.
    client, _server, sid = open_pair(initial_window=4 * MAX_FRAME_PAYLOAD)
    client.send(sid, b"x" * (3 * MAX_FRAME_PAYLOAD + 5))
    data_frames = [f for f in frames(client.data_to_send()) if f[1] == FrameType.DATA]
    assert [f[4] for f in data_frames] == [MAX_FRAME_PAYLOAD] * 3 + [5]


def test_send_copies_mutable_buffers() -> None:
    client, server = make_pair(initial_window=4)
    sid = client.open_stream()
    pump(client, server)
    buf = bytearray(b"abcdefgh")
    client.send(sid, memoryview(buf))
    buf[:] = b"XXXXXXXX"
    pump(client, server)
    server.consume(sid, 4)
    pump(client, server)
    assert received_bytes(server.events_received(), sid) == b"abcdefgh"


def test_empty_send_produces_no_frame() -> None:
    client, _, sid = open_pair()
    client.send(sid, b"")
    assert client.data_to_send() == b""


def test_data_to_send_is_empty_when_nothing_is_pending() -> None:
    client, _ = make_pair()
    assert client.data_to_send() == b""
    assert client.events_received() == []


def test_send_on_unknown_stream_raises() -> None:
    client, _ = make_pair()
    with pytest.raises(MuxError):
        client.send(99, b"x")


# --------------------------------------------------------------------------- half close


def test_fin_half_closes_and_stream_closes_after_both_fins() -> None:
    client, server, sid = open_pair()
    client.send(sid, b"request")
    client.end_stream(sid)
    pump(client, server)
    assert server.events_received() == [DataReceived(sid, b"request"), StreamEnded(sid)]
    assert client.stream_ids() == [sid]  # still open for the response
    server.send(sid, b"response")
    server.end_stream(sid)
    assert server.events_received() == [StreamClosed(sid)]
    pump(client, server)
    assert client.events_received() == [
        DataReceived(sid, b"response"),
        StreamEnded(sid),
        StreamClosed(sid),
    ]
    assert client.stream_count == server.stream_count == 0


def test_fin_rides_on_last_data_frame_when_data_was_queued() -> None:
    client, server = make_pair(initial_window=10)
    sid = client.open_stream()
    pump(client, server)
    client.send(sid, b"0123456789abc")
    client.end_stream(sid)
    assert client.buffered(sid) == 3
    pump(client, server)
    server.consume(sid, 10)
    client.receive_data(server.data_to_send())
    out = frames(client.data_to_send())
    assert out == [(0, FrameType.DATA, Flags.FIN, sid, 3)]


def test_end_stream_is_idempotent_and_send_after_end_raises() -> None:
    client, _, sid = open_pair()
    client.end_stream(sid)
    client.end_stream(sid)
    assert len(frames(client.data_to_send())) == 1
    with pytest.raises(MuxError):
        client.send(sid, b"late")


def test_end_stream_on_unknown_stream_is_a_noop() -> None:
    client, _ = make_pair()
    client.end_stream(7)
    assert client.data_to_send() == b""


def test_data_after_peer_fin_is_a_protocol_error() -> None:
    client, server, sid = open_pair()
    client.end_stream(sid)
    pump(client, server)
    server.events_received()
    server.receive_data(encode_header(FrameType.DATA, 0, sid, 1) + b"x")
    assert "after the peer's FIN" in terminated(server).error


# --------------------------------------------------------------------------- reset


@pytest.mark.parametrize("reason", list(ResetReason))
def test_reset_delivers_reason_and_closes_stream_on_both_sides(reason: ResetReason) -> None:
    client, server, sid = open_pair()
    client.send(sid, b"partial")
    server.reset_stream(sid, reason)
    assert server.events_received() == [StreamClosed(sid)]
    assert server.stream_count == 0
    pump(client, server)
    events = client.events_received()
    assert events == [StreamReset(sid, reason), StreamClosed(sid)]
    assert client.stream_count == 0
    assert server.events_received() == []  # late DATA for the reset stream is ignored
    assert not server.closed


def test_reset_with_plain_window_update_rst_means_normal() -> None:
    client, _server, sid = open_pair()
    client.receive_data(encode_header(FrameType.WINDOW_UPDATE, Flags.RST, sid, 0))
    assert client.events_received() == [StreamReset(sid, ResetReason.NORMAL), StreamClosed(sid)]


def test_reset_drops_queued_data_and_unknown_reset_is_noop() -> None:
    client, server = make_pair(initial_window=4)
    sid = client.open_stream()
    pump(client, server)
    client.send(sid, b"0123456789")
    assert client.buffered(sid) == 6
    client.reset_stream(sid, ResetReason.CANCELLED)
    assert client.buffered(sid) == 0
    client.reset_stream(sid)
    client.reset_stream(12345)
    assert client.events_received() == [StreamClosed(sid)]
    with pytest.raises(MuxError):
        client.send(sid, b"x")


def test_late_frames_for_a_fully_closed_stream_are_ignored() -> None:
    client, server, sid = open_pair()
    client.end_stream(sid)
    server.end_stream(sid)
    pump(client, server)
    client.events_received()
    client.receive_data(encode_header(FrameType.WINDOW_UPDATE, 0, sid, 100))
    client.receive_data(encode_header(FrameType.DATA, Flags.FIN, sid, 0))
    assert client.events_received() == []
    assert not client.closed


# --------------------------------------------------------------------------- ping / go away


def test_ping_is_answered_automatically_with_the_same_opaque() -> None:
    client, server = make_pair()
    opaque = client.send_ping()
    second = client.send_ping()
    assert opaque != second
    server.receive_data(client.data_to_send())
    assert server.events_received() == []
    pongs = server.data_to_send()
    assert frames(pongs) == [
        (0, FrameType.PING, Flags.ACK, 0, opaque),
        (0, FrameType.PING, Flags.ACK, 0, second),
    ]
    client.receive_data(pongs)
    assert client.events_received() == [PongReceived(opaque), PongReceived(second)]


def test_go_away_blocks_new_streams_on_both_sides_but_existing_streams_continue() -> None:
    client, server, sid = open_pair()
    server.go_away()
    server.go_away()  # sent once
    assert frames(server.data_to_send()) == [(0, FrameType.GO_AWAY, 0, 0, 0)]
    assert server.going_away
    with pytest.raises(MuxError):
        server.open_stream()
    client.receive_data(encode_header(FrameType.GO_AWAY, 0, 0, 0))
    assert client.events_received() == [GoAwayReceived(0)]
    assert client.peer_going_away
    with pytest.raises(MuxError):
        client.open_stream()
    client.send(sid, b"still works")
    pump(client, server)
    assert received_bytes(server.events_received(), sid) == b"still works"


def test_incoming_syn_after_go_away_is_rejected_as_never_dispatched() -> None:
    client, server = make_pair()
    sid = client.open_stream()
    client.send(sid, b"early")
    server.go_away()
    server.data_to_send()
    pump(client, server)
    assert server.events_received() == []
    assert server.stream_count == 0
    assert client.events_received() == [
        StreamReset(sid, ResetReason.REJECTED),
        StreamClosed(sid),
    ]


def test_go_away_code_is_reported() -> None:
    client, server = make_pair()
    server.go_away(GoAwayCode.INTERNAL_ERROR)
    pump(client, server)
    assert client.events_received() == [GoAwayReceived(2)]


# --------------------------------------------------------------------------- flow control


def test_sender_stops_at_the_window_and_resumes_after_consume() -> None:
    window = 64 * 1024
    client, server = make_pair(initial_window=window)
    sid = client.open_stream()
    pump(client, server)
    client.send(sid, b"a" * (window + 1000))
    assert client.buffered(sid) == 1000
    pump(client, server)
    got = server.events_received()
    assert len(received_bytes(got, sid)) == window
    assert client.buffered(sid) == 1000
    server.consume(sid, window // 2 - 1)
    assert server.data_to_send() == b""  # below half the window: no update yet
    server.consume(sid, 1)
    pump(client, server)
    assert client.buffered(sid) == 0
    assert client.events_received() == [SendWindowAvailable(sid)]
    assert len(received_bytes(server.events_received(), sid)) == 1000


def test_send_window_available_only_after_buffer_was_nonempty() -> None:
    client, server = make_pair(initial_window=1024)
    sid = client.open_stream()
    pump(client, server)
    client.send(sid, b"x" * 1024)
    assert client.buffered(sid) == 0
    server.receive_data(client.data_to_send())
    server.consume(sid, 1024)
    client.receive_data(server.data_to_send())
    assert client.events_received() == []


def pump_consuming(client: Session, server: Session) -> bytes:
    """Pump while the server consumes every byte as soon as it arrives; return the bytes."""
    got = bytearray()
    while True:
        moved = False
        data = client.data_to_send()
        if data:
            server.receive_data(data)
            moved = True
        for event in server.events_received():
            if isinstance(event, DataReceived):
                got += event.data
                server.consume(event.stream_id, len(event.data))
        data = server.data_to_send()
        if data:
            client.receive_data(data)
            moved = True
        if not moved:
            return bytes(got)


def test_windows_grow_when_the_reader_keeps_up() -> None:
    window = 16 * 1024
    client, server = make_pair(initial_window=window, max_window=8 * window)
    sid = client.open_stream()
    pump(client, server)
    total = 0
    for _ in range(20):
        client.send(sid, b"z" * (4 * window))
        total += len(pump_consuming(client, server))
    assert total == 20 * 4 * window
    # Now the reader stalls: the sender can put more than the initial window in flight.
    client.send(sid, b"y" * (16 * window))
    server.receive_data(client.data_to_send())
    in_flight = 16 * window - client.buffered(sid)
    assert in_flight == 8 * window  # grown to max_window, never beyond
    assert not server.closed


def test_window_does_not_grow_when_the_reader_lags() -> None:
    window = 16 * 1024
    client, server = make_pair(initial_window=window, max_window=8 * window)
    sid = client.open_stream()
    pump(client, server)
    client.send(sid, b"z" * (40 * window))
    for _ in range(40):
        pump(client, server)
        # the reader is always a full window behind and consumes half of it at a time
        server.consume(sid, window // 2)
    pump(client, server)
    got = received_bytes(server.events_received(), sid)
    assert len(got) == window + 40 * (window // 2)  # the window stayed at its initial size


def test_receiver_that_does_not_consume_stalls_only_that_stream() -> None:
    client, server = make_pair(initial_window=1024)
    stalled = client.open_stream()
    flowing = client.open_stream()
    pump(client, server)
    client.send(stalled, b"s" * 5000)
    for _ in range(10):
        client.send(flowing, b"f" * 1000)
        pump(client, server)
        for event in server.events_received():
            if isinstance(event, DataReceived) and event.stream_id == flowing:
                server.consume(flowing, len(event.data))
        pump(client, server)
    assert client.buffered(stalled) == 5000 - 1024
    assert client.buffered(flowing) == 0


def test_consume_on_unknown_stream_is_a_noop() -> None:
    client, _ = make_pair()
    client.consume(3, 100)
    assert client.data_to_send() == b""


# --------------------------------------------------------------------------- close


def test_close_emits_stream_closed_for_every_open_stream() -> None:
    client, _server = make_pair()
    a = client.open_stream()
    b = client.open_stream()
    client.data_to_send()
    client.close()
    assert client.closed
    assert client.events_received() == [StreamClosed(a), StreamClosed(b)]
    assert client.stream_count == 0
    with pytest.raises(MuxError):
        client.open_stream()
    client.receive_data(encode_header(FrameType.PING, Flags.SYN, 0, 1))
    assert client.data_to_send() == b""


def test_close_keeps_already_queued_output() -> None:
    client, _ = make_pair()
    client.go_away()
    client.close()
    assert frames(client.data_to_send()) == [(0, FrameType.GO_AWAY, 0, 0, 0)]


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (bytes([1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]), "version"),
        (encode_header(7, 0, 0, 0), "unknown frame type 7"),
        (encode_header(FrameType.DATA, 0, 2, 16 * 1024 * 1024 + 1), "exceeds the maximum"),
        (encode_header(FrameType.DATA, 0, 4, 1) + b"x", "never opened"),
        (encode_header(FrameType.WINDOW_UPDATE, 0, 2, 10), "never opened"),
        (encode_header(FrameType.DATA, 0, 0, 0), "stream 0"),
        (encode_header(FrameType.WINDOW_UPDATE, Flags.SYN, 3, 0), "wrong parity"),
        (encode_header(FrameType.PING, Flags.SYN, 5, 0), "PING frame on stream 5"),
        (encode_header(FrameType.PING, 0, 0, 0), "without SYN or ACK"),
        (encode_header(FrameType.GO_AWAY, 0, 1, 0), "GO_AWAY frame on stream 1"),
    ],
)
def test_malformed_input_terminates_with_a_clear_message(raw: bytes, message: str) -> None:
    client = Session(client=True)
    client.receive_data(raw)
    event = terminated(client)
    assert message in event.error


def test_reusing_a_live_stream_id_in_syn_is_a_protocol_error() -> None:
    _client, server, sid = open_pair()
    server.receive_data(encode_header(FrameType.WINDOW_UPDATE, Flags.SYN, sid, 0))
    assert "reuses stream id" in terminated(server).error


def test_exceeding_the_receive_window_is_a_protocol_error() -> None:
    client, server = make_pair(initial_window=100)
    sid = client.open_stream()
    pump(client, server)
    server.events_received()
    server.receive_data(encode_header(FrameType.DATA, 0, sid, 101) + b"x" * 101)
    assert "exceeded receive window" in terminated(server).error


def test_window_update_overflow_is_a_protocol_error() -> None:
    client, _server, sid = open_pair()
    client.receive_data(encode_header(FrameType.WINDOW_UPDATE, 0, sid, 2**32 - 1))
    assert "window overflow" in terminated(client).error


def test_protocol_error_closes_open_streams_and_ignores_further_input() -> None:
    client, _server, sid = open_pair()
    client.receive_data(encode_header(9, 0, 0, 0) + encode_header(FrameType.PING, Flags.SYN, 0, 1))
    assert client.events_received() == [
        StreamClosed(sid),
        ConnectionTerminated("unknown frame type 9"),
    ]
    assert frames(client.data_to_send()) == [(0, FrameType.GO_AWAY, 0, 0, 1)]
    client.receive_data(encode_header(FrameType.PING, Flags.SYN, 0, 1))
    assert client.data_to_send() == b""
    with pytest.raises(MuxError):
        client.open_stream()


def test_frames_split_at_every_byte_are_reassembled() -> None:
    client, server, sid = open_pair()
    client.send(sid, b"split me")
    client.send_ping()
    data = client.data_to_send()
    for i in range(len(data)):
        server.receive_data(data[i : i + 1])
    # The payload is delivered as it arrives: one event per received piece, in order.
    events = server.events_received()
    assert [type(ev) for ev in events] == [DataReceived] * len(b"split me")
    assert {ev.stream_id for ev in events} == {sid}
    assert b"".join(ev.data for ev in events) == b"split me"
    assert len(frames(server.data_to_send())) == 1  # the pong


def test_reset_frame_with_more_than_one_reason_byte_is_a_protocol_error() -> None:
    client, _server, sid = open_pair()
    client.receive_data(encode_header(FrameType.DATA, Flags.RST, sid, 2) + b"\x01\x02")
    assert "RST frame carries 2 bytes" in terminated(client).error


def test_constructor_rejects_bad_windows() -> None:
    with pytest.raises(ValueError):
        Session(client=True, initial_window=0)
    with pytest.raises(ValueError):
        Session(client=True, initial_window=DEFAULT_WINDOW, max_window=DEFAULT_WINDOW - 1)


def test_delivered_data_never_aliases_a_writable_buffer() -> None:
    client, server, sid = open_pair()
    client.send(sid, b"payload")
    wire = bytearray(client.data_to_send())
    server.receive_data(wire)
    wire[:] = b"\0" * len(wire)  # the caller reuses its buffer
    (event,) = server.events_received()
    assert isinstance(event, DataReceived) and bytes(event.data) == b"payload"
    assert event.data.readonly


def test_fin_applies_after_a_payload_cut_across_calls() -> None:
    _, server, sid = open_pair()
    wire = encode_header(FrameType.DATA, Flags.FIN, sid, 10) + b"0123456789"
    server.receive_data(wire[:-4])
    first = server.events_received()
    assert [type(ev) for ev in first] == [DataReceived]  # no StreamEnded before the last byte
    server.receive_data(wire[-4:])
    assert [type(ev) for ev in server.events_received()] == [DataReceived, StreamEnded]


def test_payload_for_a_stream_reset_mid_frame_is_dropped() -> None:
    client, server, sid = open_pair()
    client.send(sid, b"a" * 100)
    wire = client.data_to_send()
    server.receive_data(wire[:50])
    server.events_received()
    server.reset_stream(sid)
    assert server.events_received() == [StreamClosed(sid)]
    server.receive_data(wire[50:])
    assert server.events_received() == []
    client.send_ping()
    server.receive_data(client.data_to_send())  # the frame boundary was kept: still in sync
    assert not server.closed


class _Sized:
    """A payload the caller writes itself (as the agent's pipe chunks are)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def test_a_sized_payload_is_framed_in_place_and_uses_the_window() -> None:
    client, _, sid = open_pair()
    window = client.send_window(sid)
    chunk = _Sized(1000)
    client.send_sized(sid, chunk)
    out = client.take_output()
    assert out[-1] is chunk  # not copied: the caller writes it after its header
    assert decode_header(out[-2], 0) == (0, FrameType.DATA, 0, sid, 1000)
    assert client.send_window(sid) == window - 1000


def test_a_sized_payload_that_does_not_fit_is_refused() -> None:
    client, _, sid = open_pair()
    with pytest.raises(MuxError, match="do not fit"):
        client.send_sized(sid, _Sized(client.send_window(sid) + 1))
    client.send(sid, b"x" * (client.send_window(sid) + 5))  # 5 bytes stay queued
    with pytest.raises(MuxError, match="do not fit"):
        client.send_sized(sid, _Sized(1))  # it would overtake the queued bytes
    client.end_stream(sid)
    with pytest.raises(MuxError, match="ended locally"):
        client.send_sized(sid, _Sized(1))


def test_want_window_reports_the_next_credit() -> None:
    client, server, sid = open_pair()
    client.send_sized(sid, _Sized(client.send_window(sid)))  # the window is used up
    assert client.send_window(sid) == 0
    client.want_window(sid)
    header = client.take_output()[-2]  # the payload is the caller's to write
    server.receive_data(header + b"\0" * DEFAULT_WINDOW)
    server.consume(sid, DEFAULT_WINDOW)
    client.receive_data(server.data_to_send())
    assert client.events_received() == [SendWindowAvailable(sid)]
    assert client.send_window(sid) > 0
