"""Specification of deferred acknowledgements: a side that takes a stream only once it can serve
it (an agent of a TCP endpoint acknowledges after its dial to the service succeeded)."""

from __future__ import annotations

from pico.mux.acks import AckWatch
from pico.mux.frame import Flags, FrameType, ResetReason, decode_header
from pico.mux.session import (
    Session,
    StreamAccepted,
    StreamClosed,
    StreamOpened,
    StreamReset,
)


def frames(data: bytes) -> list[tuple[FrameType, int, int, int]]:
    """(type, flags, stream id, length) of each frame in `data`."""
    out = []
    pos = 0
    while pos < len(data):
        _, ftype, flags, sid, length = decode_header(data, pos)
        out.append((FrameType(ftype), flags, sid, length))
        pos += 12 + (length if ftype == FrameType.DATA else 0)
    return out


def opened() -> tuple[Session, Session, int]:
    """A node that opened a stream, and an agent deferring its ACK that read the SYN."""
    node, agent = Session(client=False), Session(client=True, defer_acks=True)
    sid = node.open_stream()
    assert node.report_ack(sid)
    agent.receive_data(node.data_to_send())
    assert agent.events_received() == [StreamOpened(sid)]
    return node, agent, sid


def test_a_deferred_stream_is_answered_at_once_and_acknowledged_only_when_accepted() -> None:
    node, agent, sid = opened()
    answer = agent.data_to_send()
    assert frames(answer) == [(FrameType.WINDOW_UPDATE, 0, sid, 0)]  # read, no ACK
    node.receive_data(answer)
    assert node.answered(sid) and not node.acknowledged(sid)
    assert node.events_received() == []
    agent.accept_stream(sid)
    ack = agent.data_to_send()
    assert frames(ack) == [(FrameType.WINDOW_UPDATE, Flags.ACK, sid, 0)]
    node.receive_data(ack)
    assert node.acknowledged(sid)
    assert node.events_received() == [StreamAccepted(sid)]


def test_accepting_twice_or_after_a_reset_sends_nothing_more() -> None:
    _, agent, sid = opened()
    agent.data_to_send()
    agent.accept_stream(sid)
    agent.accept_stream(sid)
    assert len(frames(agent.data_to_send())) == 1
    _, agent2, sid2 = opened()
    agent2.reset_stream(sid2, ResetReason.REFUSED)
    agent2.accept_stream(sid2)
    assert [f[1] for f in frames(agent2.data_to_send())] == [0, Flags.RST]


def test_a_dial_failure_reaches_the_opener_as_a_reset_before_any_ack() -> None:
    node, agent, sid = opened()
    agent.reset_stream(sid, ResetReason.REFUSED)  # the service refused the connection
    node.receive_data(agent.data_to_send())
    assert node.events_received() == [StreamReset(sid, ResetReason.REFUSED), StreamClosed(sid)]
    assert not node.acknowledged(sid)


def test_the_ack_comes_before_the_first_bytes_of_the_stream() -> None:
    node, agent, sid = opened()
    agent.accept_stream(sid)
    agent.send(sid, b"banner")  # a service that speaks first (SSH, SMTP)
    node.receive_data(agent.data_to_send())
    events = node.events_received()
    assert events[0] == StreamAccepted(sid)
    assert bytes(events[1].data) == b"banner"  # type: ignore[union-attr]


def test_without_deferral_a_stream_is_acknowledged_at_once_and_nothing_is_reported() -> None:
    node, agent = Session(client=False), Session(client=True)
    sid = node.open_stream()
    agent.receive_data(node.data_to_send())
    answer = agent.data_to_send()
    assert frames(answer) == [(FrameType.WINDOW_UPDATE, Flags.ACK, sid, 0)]
    agent.accept_stream(sid)  # a no-op: already acknowledged
    assert agent.data_to_send() == b""
    node.receive_data(answer)
    assert node.acknowledged(sid) and node.answered(sid)
    assert node.events_received() == []  # no report_ack: no event (the HTTP path's cost)
    assert not node.report_ack(sid)  # already acknowledged: nothing to wait for


def test_a_stream_the_peer_is_still_dialing_is_not_given_up_as_a_frozen_peer() -> None:
    """The node's ack timeout (`proxy.stream_ack_timeout`) gives up streams whose SYN the
    agent never read while silent. A slow dial is no such stream: the agent answered."""
    node, agent, sid = opened()
    watch = AckWatch()
    watch.opened(sid)
    node.receive_data(agent.data_to_send())  # the answer: read, dialing
    watch.heard = True

    def unanswered(stream_id: int) -> bool:
        return not node.answered(stream_id)

    for _ in range(20):  # ten timeouts of silence while the dial goes on
        assert watch.tick(unanswered) == []
    assert watch.responsive
    # A SYN the agent never answered is still given up.
    other = node.open_stream()
    watch.opened(other)
    assert [watch.tick(unanswered) for _ in range(3)] == [[], [], [other]]
