"""What a mux session reports to its caller (see `Session.events_received`)."""

from __future__ import annotations

from dataclasses import dataclass

from pico.mux.frame import ResetReason


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream (SYN received); the core has already ACKed it, unless the
    session defers acknowledgements (``defer_acks``: see :meth:`Session.accept_stream`)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """The peer acknowledged a stream we opened and asked about (:meth:`Session.report_ack`)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamRefused:
    """The peer's SYN was refused with RST(REFUSED) and no state was kept: ``limit`` says
    which (``max_streams``: too many streams open; ``accept_streams``: none are accepted)."""

    stream_id: int
    limit: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Payload bytes, in order. The caller must later call ``consume(stream_id, len(data))``.

    A read-only view on the bytes given to ``receive_data`` (no copy); one DATA frame may
    arrive as several events.
    """

    stream_id: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent FIN: no more data will arrive on this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer sent RST; the stream is gone (a ``StreamClosed`` follows)."""

    stream_id: int
    reason: ResetReason


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """The stream finished both ways or was reset; its state is freed. Exactly once."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class SendWindowAvailable:
    """The stream's queued unsent bytes dropped to 0 after being > 0, or credit arrived after
    :meth:`Session.want_window`; resume reading."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The peer answered one of our pings."""

    opaque: int


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer will accept no new streams."""

    code: int


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The peer broke the protocol; the session is closed and a GO_AWAY is queued."""

    error: str


Event = (
    StreamOpened
    | StreamAccepted
    | DataReceived
    | StreamEnded
    | StreamRefused
    | StreamReset
    | StreamClosed
    | SendWindowAvailable
    | PongReceived
    | GoAwayReceived
    | ConnectionTerminated
)
