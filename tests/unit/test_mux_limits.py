"""Specification of what a mux Session lets its peer make it hold: streams, refusals, replies."""

from __future__ import annotations

from pico.mux.frame import Flags, FrameType, GoAwayCode, ResetReason, decode_header, encode_header
from pico.mux.session import (
    MAX_REFUSED_SYNS,
    ConnectionTerminated,
    Session,
    StreamClosed,
    StreamOpened,
    StreamRefused,
)


def syn(stream_id: int) -> bytes:
    return encode_header(FrameType.WINDOW_UPDATE, Flags.SYN, stream_id, 0)


def rst_reasons(data: bytes) -> list[tuple[int, ResetReason]]:
    """(stream id, reason) of every RST frame in `data`."""
    out = []
    pos = 0
    while pos < len(data):
        _, ftype, flags, sid, length = decode_header(data, pos)
        pos += 12
        if ftype == FrameType.DATA:
            if flags & Flags.RST:
                out.append((sid, ResetReason(data[pos]) if length else ResetReason.NORMAL))
            pos += length
    return out


def test_a_side_that_accepts_no_streams_refuses_a_syn_with_rst_and_keeps_no_state() -> None:
    node = Session(client=False, accept_streams=False)
    node.receive_data(syn(1) + encode_header(FrameType.DATA, Flags(0), 1, 3) + b"abc")
    assert node.events_received() == [StreamRefused(1, "accept_streams")]
    assert rst_reasons(node.data_to_send()) == [(1, ResetReason.REFUSED)]
    assert node.stream_count == 0 and node.refused_streams == 1
    node.receive_data(encode_header(FrameType.DATA, Flags.FIN, 1, 2) + b"de")  # late: ignored
    assert node.events_received() == [] and not node.closed


def test_a_peer_that_keeps_opening_refused_streams_breaks_the_protocol() -> None:
    node = Session(client=False, accept_streams=False)
    node.receive_data(b"".join(syn(1 + 2 * i) for i in range(MAX_REFUSED_SYNS)))
    assert not node.closed
    node.data_to_send()
    node.receive_data(syn(1 + 2 * MAX_REFUSED_SYNS))
    events = node.events_received()
    assert isinstance(events[-1], ConnectionTerminated)
    assert "accepts none" in events[-1].error
    assert node.closed
    out = node.data_to_send()
    assert decode_header(out, len(out) - 12)[1:] == (
        FrameType.GO_AWAY,
        0,
        0,
        GoAwayCode.PROTOCOL_ERROR,
    )


def test_syns_beyond_max_streams_are_refused_until_a_stream_closes() -> None:
    agent = Session(client=True, max_streams=2)
    agent.receive_data(syn(2) + syn(4) + syn(6))
    assert agent.events_received() == [
        StreamOpened(2),
        StreamOpened(4),
        StreamRefused(6, "max_streams"),
    ]
    assert rst_reasons(agent.data_to_send()) == [(6, ResetReason.REFUSED)]
    assert agent.stream_count == 2 and agent.refused_streams == 1
    agent.reset_stream(2)
    assert agent.events_received() == [StreamClosed(2)]
    agent.receive_data(syn(8))
    assert agent.events_received() == [StreamOpened(8)]
    # Refusing is no protocol error for a side that accepts streams: no limit on refusals.
    agent.receive_data(b"".join(syn(10 + 2 * i) for i in range(3 * MAX_REFUSED_SYNS)))
    assert not agent.closed and agent.refused_streams == 1 + 3 * MAX_REFUSED_SYNS


def test_streams_closed_by_both_fins_or_a_peer_reset_free_their_slot() -> None:
    agent = Session(client=True, max_streams=1)
    agent.receive_data(syn(2))
    agent.end_stream(2)
    agent.receive_data(encode_header(FrameType.WINDOW_UPDATE, Flags.FIN, 2, 0))
    agent.receive_data(syn(4))
    agent.receive_data(encode_header(FrameType.DATA, Flags.RST, 4, 0))
    agent.receive_data(syn(6))
    opened = [e for e in agent.events_received() if isinstance(e, StreamOpened)]
    assert opened == [StreamOpened(2), StreamOpened(4), StreamOpened(6)]
    assert agent.refused_streams == 0


def test_a_stream_we_open_is_acknowledged_once_the_peer_acks_its_syn() -> None:
    node, agent = Session(client=False), Session(client=True)
    sid = node.open_stream()
    assert not node.acknowledged(sid)
    agent.receive_data(node.data_to_send())
    assert agent.acknowledged(sid)  # the side that accepted it
    node.receive_data(agent.data_to_send())
    assert node.acknowledged(sid)
    assert not node.acknowledged(sid + 2)  # unknown


def test_control_replies_count_the_frames_answered_to_the_peer() -> None:
    node, agent = Session(client=False), Session(client=True)
    ping = encode_header(FrameType.PING, Flags.SYN, 0, 7)
    agent.receive_data(ping * 5)
    assert agent.control_replies == 5
    sid = node.open_stream()
    agent.receive_data(node.data_to_send())  # the ACK of the SYN
    assert agent.control_replies == 6
    data = b"x" * (256 * 1024)
    node.send(sid, data)
    agent.receive_data(node.data_to_send())
    agent.events_received()
    agent.consume(sid, len(data))  # a WINDOW_UPDATE credits it
    assert agent.control_replies == 7
