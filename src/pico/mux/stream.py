"""A stream of a tunnel, used like an asyncio transport.

`MuxStream` is what the proxy engine and the agent hold: bytes go in with `write()`, come out
through a `StreamReceiver`'s callbacks, and flow control reaches the peer through
`pause_reading()` / `resume_reading()`. The `Tunnel` it belongs to feeds it events.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from pico.mux.frame import ResetReason
from pico.mux.session import MuxError

if TYPE_CHECKING:
    from pico.mux.splice import PipeChunk
    from pico.mux.tunnel import Tunnel

# What a MuxStream delivers to its receiver (queued until a receiver is attached).
_DATA, _EOF, _LOST, _RESUME = 0, 1, 2, 3


class StreamReceiver(Protocol):
    """Callbacks a MuxStream delivers to (the shape of asyncio.Protocol)."""

    def data_received(self, data: bytes | memoryview) -> None:
        """The next bytes of the stream: a read-only view the receiver may keep."""

    def eof_received(self) -> None: ...
    def connection_lost(self, reason: ResetReason | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


class MuxStream:
    """One stream of a tunnel, used like an asyncio transport.

    Received data is credited back to the peer (its send window) only once the receiver has
    taken it and is not paused, so a slow consumer stalls only this stream.
    """

    __slots__ = (
        "_buffered_events",
        "_closed",
        "_on_accepted",
        "_reading_paused",
        "_unconsumed",
        "_write_paused",
        "receiver",
        "stream_id",
        "tunnel",
    )

    def __init__(self, tunnel: Tunnel, stream_id: int) -> None:
        self.tunnel = tunnel
        self.stream_id = stream_id
        self.receiver: StreamReceiver | None = None
        self._reading_paused = False
        self._write_paused = False
        self._unconsumed = 0
        self._closed = False
        self._on_accepted: Callable[[], None] | None = None
        # Events that arrive before a receiver is attached (the agent attaches it after it has
        # connected to the service); bounded by the stream's receive window.
        self._buffered_events: list[tuple[int, object]] | None = None

    # -- transport side --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the stream is reset or fully closed."""
        return self._closed

    def set_receiver(self, receiver: StreamReceiver) -> None:
        """Attach the receiver and replay anything that arrived before it."""
        self.receiver = receiver
        pending, self._buffered_events = self._buffered_events, None
        for kind, value in pending or ():
            self._dispatch(kind, value)
        if self._write_paused and self.receiver is receiver:
            # A stream handed on (the idle pool) may still be waiting for window: the new
            # receiver must hold its writes until resume_writing().
            receiver.pause_writing()

    def accept(self) -> None:
        """Acknowledge a stream the peer opened on a tunnel that defers acknowledgements
        (`Tunnel(defer_acks=True)`): the peer learns the stream was taken. Call it before
        writing anything; a no-op on other tunnels, and after a reset (reset to refuse)."""
        if not self._closed:
            self.tunnel.session.accept_stream(self.stream_id)
            self.tunnel.wake_writer()

    def when_accepted(self, callback: Callable[[], None]) -> bool:
        """Call `callback` once the peer acknowledges this stream we opened, before any of
        its bytes reach the receiver. Returns False, and never calls it, if the peer already
        has or the stream is closed (its receiver hears of that)."""
        if self._closed or not self.tunnel.session.report_ack(self.stream_id):
            return False
        self._on_accepted = callback
        return True

    def peer_accepted(self) -> None:
        """From the tunnel: the peer acknowledged the stream (see when_accepted)."""
        callback, self._on_accepted = self._on_accepted, None
        if callback is not None and not self._closed:
            callback()

    def write(self, data: bytes | memoryview) -> None:
        """Queue bytes to the peer; calls receiver.pause_writing() when the window is full."""
        if self._closed:
            return
        session = self.tunnel.session
        try:
            session.send(self.stream_id, data)
        except MuxError:
            return
        self.tunnel.wake_writer()
        if not self._write_paused and (
            session.buffered(self.stream_id) > 0 or self.tunnel.write_blocked
        ):
            self._write_paused = True
            if self.receiver is not None:
                self.receiver.pause_writing()

    def send_window(self) -> int:
        """Bytes that may be sent now (see pause_if_blocked)."""
        return 0 if self._closed else self.tunnel.session.send_window(self.stream_id)

    def write_chunk(self, chunk: PipeChunk) -> None:
        """Send bytes waiting in a pipe (at most send_window()); the tunnel splices them out."""
        if self._closed:
            chunk.pipe.discard()
            return
        tunnel = self.tunnel
        try:
            tunnel.session.send_sized(self.stream_id, chunk)
        except MuxError:
            chunk.pipe.discard()
            return
        tunnel.wake_writer()
        self.pause_if_blocked()

    def pause_if_blocked(self) -> None:
        """Call receiver.pause_writing() if the send window or the tunnel is full (and
        resume_writing() once it is not)."""
        tunnel = self.tunnel
        session = tunnel.session
        if self._write_paused:
            return
        if session.send_window(self.stream_id) <= 0:
            session.want_window(self.stream_id)
        elif not tunnel.write_blocked:
            return
        self._write_paused = True
        if self.receiver is not None:
            self.receiver.pause_writing()

    def write_eof(self) -> None:
        """Half-close: the peer sees end of stream after the queued bytes."""
        if not self._closed:
            with contextlib.suppress(MuxError):
                self.tunnel.session.end_stream(self.stream_id)
            self.tunnel.wake_writer()

    def reset(self, reason: ResetReason = ResetReason.CANCELLED) -> None:
        """Abort the stream in both directions; the receiver is not called again."""
        if self._closed:
            return
        self._closed = True
        self.receiver = None
        self._on_accepted = None
        self.tunnel.session.reset_stream(self.stream_id, reason)
        self.tunnel.forget(self.stream_id)
        self.tunnel.wake_writer()

    def get_write_buffer_size(self) -> int:
        """Bytes queued locally, waiting for the peer's window."""
        return self.tunnel.session.buffered(self.stream_id)

    def pause_reading(self) -> None:
        """Stop crediting the peer: it may send at most one more window of data."""
        self._reading_paused = True

    def resume_reading(self) -> None:
        """Credit the peer for everything received so far."""
        self._reading_paused = False
        if self._unconsumed and not self._closed:
            n, self._unconsumed = self._unconsumed, 0
            self.tunnel.session.consume(self.stream_id, n)
            self.tunnel.wake_writer()

    # -- events from the tunnel ------------------------------------------------------------------

    def _dispatch(self, kind: int, value: object) -> None:
        receiver = self.receiver
        if receiver is None:
            if kind == _LOST:
                # Reset before anyone took it (the agent was still dialing): what arrived is
                # never delivered, so a request retried elsewhere never reaches this service.
                self._buffered_events = [(kind, value)]
                return
            if self._buffered_events is None:
                self._buffered_events = []
            if type(value) is memoryview:
                value = bytes(value)  # kept for a while: do not pin a tunnel read buffer
            self._buffered_events.append((kind, value))
            return
        if kind == _DATA:
            data = value
            assert isinstance(data, memoryview | bytes)
            receiver.data_received(data)
            if self._closed:
                return
            if self._reading_paused:
                self._unconsumed += len(data)
            else:
                self.tunnel.session.consume(self.stream_id, len(data))
        elif kind == _EOF:
            receiver.eof_received()
        elif kind == _LOST:
            self.receiver = None
            receiver.connection_lost(value if isinstance(value, ResetReason) else None)
        elif kind == _RESUME and self._write_paused and not self.tunnel.write_blocked:
            self._write_paused = False
            receiver.resume_writing()

    def _lost(self, reason: ResetReason | None) -> None:
        if self._closed and self.receiver is None and self._buffered_events is None:
            return
        self._closed = True
        self._on_accepted = None
        self._dispatch(_LOST, reason)
