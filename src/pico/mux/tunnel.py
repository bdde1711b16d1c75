"""The asyncio layer of the multiplexer: one mux `Session` over one WebSocket.

`Tunnel` owns three tasks (reader, writer, pinger) and hands out `MuxStream`s, which behave like
asyncio transports: bytes go in with `write()`, come out through a `StreamReceiver`'s callbacks,
and flow control reaches the peer through `pause_reading()` / `resume_reading()`.

Everything the session produces during one loop iteration leaves in one WebSocket message: the
writer task wakes at most once per iteration and sends whatever has accumulated.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from pico import log
from pico.mux.frame import ResetReason
from pico.mux.session import (
    ConnectionTerminated,
    DataReceived,
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

_log = log.get_logger("mux")

# A WebSocket message carries at most this much; bigger flushes are split. The peer's reader
# limit (MAX_MESSAGE_SIZE) protects its memory from a hostile sender.
_MAX_SEND_MESSAGE = 4 * 1024 * 1024
MAX_MESSAGE_SIZE = 8 * 1024 * 1024
# The most one stream may have in flight towards us. When its consumer stalls (a client that
# stops reading), up to this much lands in memory before the peer is stopped, so it is the
# per-stream memory bound; it also caps one stream's throughput at max_window / RTT
# (4 MiB at 50 ms is 80 MB/s).
DEFAULT_MAX_WINDOW = 4 * 1024 * 1024


class WebSocketLike(Protocol):
    """What a Tunnel needs from aiohttp's client or server WebSocket."""

    async def send_bytes(self, data: bytes) -> None: ...
    async def receive(self, timeout: float | None = None) -> object: ...
    async def close(self, *, code: int = ..., message: bytes = ...) -> bool: ...


class StreamReceiver(Protocol):
    """Callbacks a MuxStream delivers to (the shape of asyncio.Protocol)."""

    def data_received(self, data: bytes) -> None: ...
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
        if not self._write_paused and session.buffered(self.stream_id) > 0:
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
        self.tunnel.session.reset_stream(self.stream_id, reason)
        self.tunnel.forget(self.stream_id)
        self.tunnel.wake_writer()

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

    def get_write_buffer_size(self) -> int:
        """Bytes queued locally, waiting for the peer's window."""
        return self.tunnel.session.buffered(self.stream_id)

    # -- events from the tunnel ------------------------------------------------------------------

    _DATA, _EOF, _LOST, _RESUME = 0, 1, 2, 3

    def _dispatch(self, kind: int, value: object) -> None:
        receiver = self.receiver
        if receiver is None:
            if self._buffered_events is None:
                self._buffered_events = []
            self._buffered_events.append((kind, value))
            return
        if kind == 0:
            data = value
            assert isinstance(data, bytes)
            receiver.data_received(data)
            if self._closed:
                return
            if self._reading_paused:
                self._unconsumed += len(data)
            else:
                self.tunnel.session.consume(self.stream_id, len(data))
        elif kind == 1:
            receiver.eof_received()
        elif kind == 2:
            self.receiver = None
            receiver.connection_lost(value if isinstance(value, ResetReason) else None)
        elif kind == 3 and self._write_paused:
            self._write_paused = False
            receiver.resume_writing()

    def _lost(self, reason: ResetReason | None) -> None:
        if self._closed and self.receiver is None and self._buffered_events is None:
            return
        self._closed = True
        self._dispatch(2, reason)


class Tunnel:
    """A mux session over a WebSocket: runs until the socket closes or the peer misbehaves.

    `on_stream` is called for each stream the peer opens (the agent side). `ping_interval`
    and `ping_timeout` detect a dead peer even when TCP says nothing (half-open connections
    behind NATs and load balancers). `max_window` bounds each stream's receive window (see
    DEFAULT_MAX_WINDOW).
    """

    def __init__(
        self,
        ws: WebSocketLike,
        *,
        client: bool,
        on_stream: Callable[[MuxStream], None] | None = None,
        ping_interval: float = 15.0,
        ping_timeout: float = 15.0,
        name: str = "",
        max_window: int = DEFAULT_MAX_WINDOW,
    ) -> None:
        self.ws = ws
        self.session = Session(client=client, max_window=max_window)
        self.name = name
        self.on_stream = on_stream
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.streams: dict[int, MuxStream] = {}
        self.close_reason = ""
        self.on_goaway: Callable[[], None] | None = None
        self._wakeup = asyncio.Event()
        self._pong: asyncio.Future[None] | None = None
        self._ping_opaque = -1
        self._done = asyncio.Event()
        self._no_streams = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- public API ------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """True while new streams may be opened on this tunnel."""
        s = self.session
        return not (s.closed or s.going_away or s.peer_going_away or self._done.is_set())

    def open_stream(self) -> MuxStream:
        """Open a new stream to the peer. Raises MuxError if the tunnel is closing."""
        if self._done.is_set():
            raise MuxError("tunnel closed")
        stream_id = self.session.open_stream()
        stream = MuxStream(self, stream_id)
        self.streams[stream_id] = stream
        self.wake_writer()
        return stream

    def go_away(self) -> None:
        """Tell the peer not to open new streams; existing ones continue."""
        if not self.session.closed and not self.session.going_away:
            self.session.go_away()
            self.wake_writer()

    def wake_writer(self) -> None:
        """Ask the writer task to flush at the end of this loop iteration."""
        self._wakeup.set()

    def forget(self, stream_id: int) -> MuxStream | None:
        """Drop a stream from the table (after a reset or close); returns it if it was there."""
        stream = self.streams.pop(stream_id, None)
        if not self.streams:
            self._no_streams.set()
        return stream

    async def run(self) -> None:
        """Serve the tunnel until it closes. Safe to cancel: the socket is then closed."""
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read_loop())
        writer = loop.create_task(self._write_loop())
        pinger = loop.create_task(self._ping_loop())
        self._tasks = {reader, writer, pinger}
        try:
            await self._done.wait()
        finally:
            self._done.set()
            # Give the writer one chance to send what is queued (a GoAway, final RSTs).
            self._wakeup.set()
            for task in (reader, pinger):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(writer), 1.0)
            writer.cancel()
            await asyncio.gather(reader, writer, pinger, return_exceptions=True)
            self._close_streams()
            with contextlib.suppress(Exception):
                await self.ws.close()

    async def drain_and_close(self, timeout: float) -> None:
        """Send GoAway, wait up to `timeout` for open streams to finish, then close."""
        self.go_away()
        if self.streams:
            self._no_streams.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_streams.wait(), timeout)
        self.close("closed by local side")

    def close(self, reason: str = "closed") -> None:
        """Stop the tunnel; `run()` returns soon after."""
        if not self.close_reason:
            self.close_reason = reason
        self._done.set()

    @property
    def closed(self) -> bool:
        """True once the tunnel has stopped or is stopping."""
        return self._done.is_set()

    # -- internals -------------------------------------------------------------------------------

    def _close_streams(self) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream._lost(ResetReason.GOING_AWAY)

    async def _read_loop(self) -> None:
        from aiohttp import WSMsgType

        session = self.session
        try:
            while True:
                msg = await self.ws.receive()
                mtype = msg.type  # type: ignore[attr-defined]
                if mtype == WSMsgType.BINARY:
                    session.receive_data(msg.data)  # type: ignore[attr-defined]
                    self._handle_events()
                    if session.closed:
                        return
                elif mtype in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    self.close("websocket closed by peer")
                    return
                elif mtype == WSMsgType.ERROR:
                    self.close(f"websocket error: {self.ws.exception()}")  # type: ignore[attr-defined]
                    return
                else:
                    self.close(f"unexpected websocket message type {mtype!r}")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken socket must end the tunnel, not the process
            self.close(f"read failed: {exc!r}")

    def _handle_events(self) -> None:
        streams = self.streams
        for ev in self.session.events_received():
            t = type(ev)
            if t is DataReceived:
                stream = streams.get(ev.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream._dispatch(0, ev.data)  # type: ignore[union-attr]
                else:
                    # Data for a stream we reset locally: credit it so the window stays whole.
                    self.session.consume(ev.stream_id, len(ev.data))  # type: ignore[union-attr]
            elif t is SendWindowAvailable:
                stream = streams.get(ev.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream._dispatch(3, None)
            elif t is StreamOpened:
                stream = MuxStream(self, ev.stream_id)  # type: ignore[union-attr]
                streams[ev.stream_id] = stream  # type: ignore[union-attr]
                if self.on_stream is None:
                    stream.reset(ResetReason.REFUSED)
                else:
                    self.on_stream(stream)
            elif t is StreamEnded:
                stream = streams.get(ev.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream._dispatch(1, None)
            elif t is StreamReset:
                stream = self.forget(ev.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream._lost(ev.reason)  # type: ignore[union-attr]
            elif t is StreamClosed:
                stream = self.forget(ev.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream._lost(None)
            elif t is PongReceived:
                if ev.opaque == self._ping_opaque and self._pong and not self._pong.done():  # type: ignore[union-attr]
                    self._pong.set_result(None)
            elif t is GoAwayReceived:
                if self.on_goaway is not None:
                    self.on_goaway()
            elif t is ConnectionTerminated:
                _log.warn("tunnel protocol error", tunnel=self.name, error=ev.error)  # type: ignore[union-attr]
                self.close(f"protocol error: {ev.error}")  # type: ignore[union-attr]
        self._wakeup.set()

    async def _write_loop(self) -> None:
        session = self.session
        ws = self.ws
        wakeup = self._wakeup
        try:
            while True:
                if not self._done.is_set():  # once closing, flush what is left and stop
                    await wakeup.wait()
                wakeup.clear()
                data = session.data_to_send()
                if not data:
                    if self._done.is_set():
                        return
                    continue
                view = memoryview(data)
                for i in range(0, len(view), _MAX_SEND_MESSAGE):
                    await ws.send_bytes(
                        bytes(view[i : i + _MAX_SEND_MESSAGE])
                        if len(view) > _MAX_SEND_MESSAGE
                        else data
                    )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.close(f"write failed: {exc!r}")

    async def _ping_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.ping_interval)
            self._pong = loop.create_future()
            self._ping_opaque = self.session.send_ping()
            self.wake_writer()
            try:
                await asyncio.wait_for(self._pong, self.ping_timeout)
            except TimeoutError:
                _log.warn("tunnel ping timeout", tunnel=self.name, timeout=self.ping_timeout)
                self.close("ping timeout")
                return
