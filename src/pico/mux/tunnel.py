"""The asyncio layer of the multiplexer: one mux `Session` over one WebSocket connection.

`Tunnel` is an asyncio Protocol on the raw connection (after the handshake of
`pico.mux.handshake`): WebSocket frames in, mux session, events out to `MuxStream`s, which behave
like asyncio transports: bytes go in with `write()`, come out through a `StreamReceiver`'s
callbacks, and flow control reaches the peer through `pause_reading()` / `resume_reading()`.

Everything the session produces during one loop iteration leaves in one WebSocket frame: the
flush is scheduled with `call_soon` at most once per iteration. No task per tunnel, no
coroutine per message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import cast

from pico import log
from pico.mux import splice
from pico.mux.acks import AckWatch
from pico.mux.buffers import READ_BUFFERS, PooledReads
from pico.mux.frame import ResetReason
from pico.mux.session import (
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    MuxError,
    PongReceived,
    SendWindowAvailable,
    Session,
    StreamAccepted,
    StreamClosed,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamReset,
)
from pico.mux.stream import _DATA, _EOF, _RESUME, MuxStream
from pico.mux.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    ZERO_KEY,
    ControlFrame,
    FrameDecoder,
    WebSocketError,
    encode_frame,
    encode_frame_parts,
    frame_header,
    frame_pieces,
)

_log = log.get_logger("mux")

# A WebSocket frame carries at most this much; bigger flushes are split. The peer's frame
# limit (MAX_MESSAGE_SIZE) protects its memory from a hostile sender.
_MAX_SEND_FRAME = 1024 * 1024
# Above this many bytes unsent on the connection, stream sources are paused.
_WRITE_HIGH_WATER = 4 * 1024 * 1024
# Flushes up to this size are joined into one frame and one write (a copy is cheaper than
# a vector of small pieces).
_SMALL_FRAME = 64 * 1024
MAX_MESSAGE_SIZE = 8 * 1024 * 1024
# The most one stream may have in flight towards us. When its consumer stalls (a client that
# stops reading), up to this much lands in memory before the peer is stopped, so it is the
# per-stream memory bound; it also caps one stream's throughput at max_window / RTT
# (4 MiB at 50 ms is 80 MB/s).
DEFAULT_MAX_WINDOW = 4 * 1024 * 1024
# Control frames the peer may make us queue (pongs, acks, refusals, window updates) while it
# does not read what we send (the write buffer is over its high-water mark). Past it the
# tunnel stops reading and closes: the defence of HTTP/2 servers against ping and reset
# floods (Go's maxQueuedControlFrames is 10000, too). Memory stays within the write buffer's
# high-water mark plus this many small frames.
DEFAULT_MAX_CONTROL_FRAMES = 10_000
# What `limit_hit` and `on_limit` name when the tunnel refuses or closes for a limit.
LIMIT_CONTROL_FRAMES = "control_frames"


class Tunnel(asyncio.BufferedProtocol):
    """A mux session over a WebSocket, on a raw asyncio transport.

    The WebSocket handshake is done elsewhere (`pico.mux.handshake`); the tunnel then takes over
    the transport with `attach()`. Everything the session produces during one loop iteration is
    written as one WebSocket frame. `ping_interval` and `ping_timeout` detect a dead peer even
    when TCP says nothing (half-open connections behind NATs and load balancers). `max_window`
    bounds each stream's receive window, so the memory a slow consumer can pin.

    What the peer may make us hold is bounded: without `on_stream` it may open no streams
    (the session refuses them without state, then fails the tunnel); with it, at most
    `max_streams` at once; and at most `max_control_frames` control frames answered while it
    does not read (then the tunnel is aborted). `on_limit(name)` is told of each refusal.

    With `ack_timeout`, a stream we opened that the peer has not answered after that long,
    while the peer was silent all along, is reset and its receiver told `UNACKNOWLEDGED` (the
    peer never read the SYN: nothing reached a service, the request may go elsewhere); the
    tunnel then counts as not `usable` until the peer is heard from again. A peer that read
    the SYN and is still deciding (`defer_acks` on its side: an agent dialing its service)
    has answered: its stream waits for the peer's ACK or reset, however long that takes.

    With `defer_acks`, streams the peer opens are acknowledged only by `MuxStream.accept()`.
    """

    def __init__(
        self,
        *,
        client: bool,
        on_stream: Callable[[MuxStream], None] | None = None,
        ping_interval: float = 15.0,
        ping_timeout: float = 15.0,
        name: str = "",
        max_window: int = DEFAULT_MAX_WINDOW,
        random_mask: bool = False,
        max_streams: int = 0xFFFFFFFF,
        max_control_frames: int = DEFAULT_MAX_CONTROL_FRAMES,
        ack_timeout: float = 0.0,
        on_limit: Callable[[str], None] | None = None,
        defer_acks: bool = False,
    ) -> None:
        self.session = Session(
            client=client,
            max_window=max_window,
            max_streams=max_streams,
            accept_streams=on_stream is not None,
            defer_acks=defer_acks,
        )
        self.client = client
        # A client masks its frames: with random keys when `random_mask`, else with ZERO_KEY.
        self.random_mask = client and random_mask
        self.decoder = FrameDecoder(expect_mask=not client, max_frame=MAX_MESSAGE_SIZE)
        self.name = name
        self.on_stream = on_stream
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.streams: dict[int, MuxStream] = {}
        self.close_reason = ""
        self.max_control_frames = max_control_frames
        self.ack_timeout = ack_timeout
        self.on_limit = on_limit
        # The limit the tunnel was closed for ("" if none): the peer misbehaved.
        self.limit_hit = ""
        self.on_goaway: Callable[[], None] | None = None
        self.transport: asyncio.Transport | None = None
        # True while the connection's write buffer is above its high-water mark: every
        # stream's source is paused, so a fast sender cannot pile data up in memory here.
        self.write_blocked = False
        self.peer = ""
        self._loop = asyncio.get_running_loop()
        self._flush_handle: asyncio.Handle | None = None
        self._control: list[bytes] = []
        self._done = asyncio.Event()
        self._no_streams = asyncio.Event()
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_deadline: asyncio.TimerHandle | None = None
        self._ping_opaque = -1
        self._barriers: dict[int, asyncio.Future[None]] = {}
        self._direct: splice.DirectWriter | None = None
        self.pipes: splice.PipePool | None = None  # when splicing: pipes for stream chunks
        # Reads go into buffers of the pool all tunnels share (see PooledReads).
        self._reads = PooledReads(READ_BUFFERS)
        # Control frames answered so far: WebSocket pongs here, the session counts its own.
        # The marks are both counts when a flush last found the write buffer under its
        # high-water mark: what was answered since is owed (unwritten, or unread).
        self._ws_replies = 0
        self._ws_mark = 0
        self._session_mark = 0
        # Streams we opened that the peer has not acknowledged yet; its timer ticks every
        # ack_timeout / 2 while any wait.
        self._acks = AckWatch()
        self._ack_timer: asyncio.TimerHandle | None = None
        self._abort = False  # close by aborting: the peer does not read what is queued

    # -- public API ------------------------------------------------------------------------------

    def attach(
        self,
        transport: asyncio.BaseTransport,
        initial: bytes = b"",
        *,
        resume: bool = False,
        direct: bool = False,
    ) -> None:
        """Take over `transport` after the handshake; `initial` is data already read past it.

        `resume` restarts reading on a transport the handshake paused (the client side).
        `direct` writes to the socket without the transport where splice(2) works (plain TCP
        on Linux, frames not masked with random keys), so streams can send pipe chunks: see
        `splicing`.
        """
        transport.set_protocol(self)
        self.connection_made(transport)
        sock = transport.get_extra_info("socket")
        if (
            direct
            and splice.supported()
            and not self.random_mask
            and sock is not None
            and transport.get_extra_info("sslcontext") is None
        ):
            self.pipes = splice.PipePool()
            self._direct = splice.DirectWriter(
                sock,
                on_error=self._write_failed,
                on_pause=self.pause_writing,
                on_resume=self.resume_writing,
                high=_WRITE_HIGH_WATER,
            )
        if initial:
            self.data_received(initial)
        if resume and self.transport is not None:
            cast(asyncio.ReadTransport, transport).resume_reading()

    @property
    def splicing(self) -> bool:
        """True when streams may send pipe chunks (MuxStream.write_chunk)."""
        return self._direct is not None and not self._direct.closed

    @property
    def usable(self) -> bool:
        """True while new streams may be opened on this tunnel (and the peer answers)."""
        s = self.session
        return not (
            s.closed
            or s.going_away
            or s.peer_going_away
            or self._done.is_set()
            or not self._acks.responsive
        )

    def open_stream(self) -> MuxStream:
        """Open a new stream to the peer. Raises MuxError if the tunnel is closing."""
        if self._done.is_set():
            raise MuxError("tunnel closed")
        stream_id = self.session.open_stream()
        stream = MuxStream(self, stream_id)
        self.streams[stream_id] = stream
        self._no_streams.clear()
        if self.ack_timeout > 0:
            self._acks.opened(stream_id)
            if self._ack_timer is None:
                self._ack_timer = self._loop.call_later(self.ack_timeout / 2, self._ack_tick)
        self.wake_writer()
        return stream

    def go_away(self) -> None:
        """Tell the peer not to open new streams; existing ones continue."""
        if not self.session.closed and not self.session.going_away:
            self.session.go_away()
            self.wake_writer()

    def wake_writer(self) -> None:
        """Flush at the end of this loop iteration (coalescing every frame produced in it)."""
        if self._flush_handle is None and self.transport is not None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def forget(self, stream_id: int) -> MuxStream | None:
        """Drop a stream from the table (after a reset or close); returns it if it was there."""
        stream = self.streams.pop(stream_id, None)
        if not self.streams:
            self._no_streams.set()
        return stream

    async def run(self) -> None:
        """Wait until the tunnel closes. Safe to cancel: the connection is then closed."""
        try:
            await self._done.wait()
        finally:
            self.close(self.close_reason or "cancelled")
            self._shutdown()

    async def drain_and_close(self, timeout: float) -> None:
        """Send GoAway, wait up to `timeout` for open streams to finish, then close."""
        self.go_away()
        loop = self._loop
        deadline = loop.time() + timeout
        # Barrier: once the peer answers a ping sent after our GoAway, it has seen the GoAway,
        # and any stream it opened before that has reached us (and was rejected as
        # never dispatched, so it is retried): closing now cuts nothing in flight.
        await self._ping_barrier(min(timeout, self.ping_timeout))
        if self.streams:
            self._no_streams.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_streams.wait(), max(0.0, deadline - loop.time()))
        self.close("closed by local side")
        if self._direct is not None:
            # A stream is done once its FIN is framed: let the bytes before it leave.
            await self._direct.wait_closed(max(1.0, deadline - loop.time()))

    async def _ping_barrier(self, timeout: float) -> None:
        if self._done.is_set() or timeout <= 0:
            return
        try:
            opaque = self.session.send_ping()
        except MuxError:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._barriers[opaque] = waiter
        self.wake_writer()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, timeout)
        finally:
            self._barriers.pop(opaque, None)

    def close(self, reason: str = "closed") -> None:
        """Stop the tunnel; `run()` returns soon after."""
        if not self.close_reason:
            self.close_reason = reason
        if not self._done.is_set():
            self._done.set()
            self._shutdown()

    @property
    def closed(self) -> bool:
        """True once the tunnel has stopped or is stopping."""
        return self._done.is_set()

    async def wait_closing(self) -> None:
        """Return once the tunnel is stopping (`close()` was called, or the peer left)."""
        await self._done.wait()

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        self._schedule_ping()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the loop reads to: a pooled buffer (the kernel copies straight into it: no
        bytes object per read)."""
        return self._reads.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        # A read-only view: consumers may keep slices, and the pool never reuses the buffer
        # while they do.
        self._reads.deliver(nbytes, self.data_received)

    def data_received(self, data: bytes | memoryview) -> None:
        self._acks.heard = True  # the peer is alive (a store, no allocation)
        try:
            payloads, controls = self.decoder.feed(data)
        except WebSocketError as exc:
            _log.warn_throttled("tunnel websocket error", tunnel=self.name, error=str(exc))
            self.close(f"websocket error: {exc}")
            return
        session = self.session
        for payload in payloads:
            session.receive_data(payload)
        if controls:
            self._answer_controls(controls)
        self._handle_events()
        if controls or session.control_replies != self._session_mark:
            self._check_replies()  # only when control frames were answered
        self.wake_writer()

    def _answer_controls(self, controls: list[ControlFrame]) -> None:
        random_key = self.random_mask
        for frame in controls:
            if frame.opcode == OP_PING:
                pong = encode_frame(OP_PONG, frame.payload, mask=self.client, random_key=random_key)
                self._control.append(pong)
                self._ws_replies += 1
            elif frame.opcode == OP_CLOSE:
                close = frame.payload[:2]
                self._control.append(
                    encode_frame(OP_CLOSE, close, mask=self.client, random_key=random_key)
                )
                self.close("websocket closed by peer")

    def _check_replies(self) -> None:
        """Close if the peer made us answer too many control frames it has not read.

        Owed is what was answered since a flush last found the write buffer under its
        high-water mark: frames not written yet (a loop iteration may read 32 times before
        it flushes) and frames written while the peer does not read. Too many owed, they are
        written out at once and counted again: a peer that reads is never cut for a burst.
        """
        if self._owed() <= self.max_control_frames or self._done.is_set():
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()
        self._mark_replies()
        owed = self._owed()
        if owed <= self.max_control_frames or self._done.is_set():
            return
        if self.transport is not None:
            self.transport.pause_reading()
        _log.warn_throttled(
            "tunnel control frame flood",
            tunnel=self.name,
            peer=self.peer,
            queued=owed,
            limit=self.max_control_frames,
        )
        self._hit_limit(LIMIT_CONTROL_FRAMES)
        self._abort = True  # what is queued would never be read: drop it with the connection
        self.close(
            f"control frame flood: {owed} control frames queued while the peer does not read "
            f"(limit {self.max_control_frames})"
        )

    def _owed(self) -> int:
        session_owed = self.session.control_replies - self._session_mark
        return session_owed + self._ws_replies - self._ws_mark

    def _mark_replies(self) -> None:
        """A flush: if the peer reads what we send, every control frame so far is answered."""
        buffered = (
            self._direct.buffered
            if self._direct is not None
            else self.transport.get_write_buffer_size()
            if self.transport is not None
            else 0
        )
        if buffered <= _WRITE_HIGH_WATER:
            self._ws_mark = self._ws_replies
            self._session_mark = self.session.control_replies

    def _hit_limit(self, name: str) -> None:
        if not self.limit_hit:
            self.limit_hit = name
        if self.on_limit is not None:
            self.on_limit(name)

    def eof_received(self) -> bool:
        self._return_read_buffer()
        self.close("connection closed by peer")
        return False

    def pause_writing(self) -> None:
        self.write_blocked = True

    def resume_writing(self) -> None:
        self.write_blocked = False
        session = self.session
        for stream in list(self.streams.values()):
            if stream._write_paused and session.buffered(stream.stream_id) == 0:
                stream._dispatch(_RESUME, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._return_read_buffer()
        self.close(f"connection lost: {exc}" if exc else "connection closed by peer")

    def _return_read_buffer(self) -> None:
        # The loop took a buffer for a read that found the end instead (no buffer_updated):
        # give it back, or every closing tunnel would keep a 1 MiB buffer of its own.
        self._reads.release()

    # -- internals -------------------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_handle = None
        transport = self.transport
        direct = self._direct
        if transport is None and direct is None:
            return
        if self.session.control_replies != self._session_mark or self._ws_replies != self._ws_mark:
            self._mark_replies()  # before this flush's own output is written
        # Local actions (our FIN after the peer's, a reset) produce events too: deliver them.
        self._handle_events()
        parts = self.session.take_output()
        if direct is not None:
            # Even with the connection gone: a closed writer releases the pipe chunks.
            self._write_direct(cast(list[splice.Piece], parts))
            return
        assert transport is not None
        if self._control:
            control, self._control = self._control, []
            transport.write(b"".join(control))
        if not parts:
            return
        size = sum(map(len, parts))
        client = self.client
        random_key = self.random_mask
        if size <= _SMALL_FRAME:
            if random_key:  # one join, one mask, header and payload as a vector
                transport.writelines(encode_frame_parts(OP_BINARY, b"".join(parts), mask=True))
            else:
                header = frame_header(OP_BINARY, size, mask_key=ZERO_KEY if client else None)
                transport.write(b"".join([header, *parts]))
            return
        # Big flushes: frames of up to _MAX_SEND_FRAME, written as vectors of the session's
        # pieces (masked piece by piece on the client), so the payload is never joined.
        group: list[bytes | memoryview] = []
        group_size = 0
        for part in parts:
            group.append(part)
            group_size += len(part)
            if group_size >= _MAX_SEND_FRAME:
                transport.writelines(
                    frame_pieces(OP_BINARY, group, group_size, mask=client, random_key=random_key)
                )
                group, group_size = [], 0
        if group:
            transport.writelines(
                frame_pieces(OP_BINARY, group, group_size, mask=client, random_key=random_key)
            )

    def _write_direct(self, parts: list[splice.Piece]) -> None:
        """Frames for the direct writer: each pipe chunk ends a frame, so it is spliced whole."""
        assert self._direct is not None
        out: list[splice.Piece] = []
        if self._control:
            out += self._control
            self._control = []
        run: list[splice.Piece] = []
        size = 0
        for part in parts:
            run.append(part)
            size += len(part)
            if type(part) is splice.PipeChunk or size >= _MAX_SEND_FRAME:
                out.append(frame_header(OP_BINARY, size, mask_key=ZERO_KEY))
                out += run
                run, size = [], 0
        if run:
            out.append(frame_header(OP_BINARY, size, mask_key=ZERO_KEY))
            out += run
        if out:
            self._direct.write(out)

    def _write_failed(self, exc: OSError) -> None:
        self.close(f"connection lost: {exc}")

    def _shutdown(self) -> None:
        for timer in (self._ping_timer, self._pong_deadline, self._ack_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._pong_deadline = self._ack_timer = None
        self._acks.waiting.clear()
        self._close_streams()
        self.session.close()
        self.session.events_received()  # dropped: the streams were failed above
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        transport = self.transport
        if self._abort:
            self.transport = None
            if transport is not None:
                transport.abort()
            if self._direct is not None:
                self._direct.close()
                self._flush()  # the closed writer releases the pipe chunks still queued
        else:
            self._flush()  # a GoAway, final RSTs, the end of responses still go out
            self.transport = None
            if transport is not None:
                transport.close()
            if self._direct is not None:
                self._direct.close(drain=True)  # what the socket did not take yet goes first
        if self.pipes is not None:
            self.pipes.close()

    def _close_streams(self) -> None:
        streams, self.streams = self.streams, {}
        self._no_streams.set()
        for stream in streams.values():
            stream._lost(ResetReason.GOING_AWAY)

    def _schedule_ping(self) -> None:
        if self.ping_interval > 0 and not self._done.is_set():
            self._ping_timer = self._loop.call_later(self.ping_interval, self._send_ping)

    def _send_ping(self) -> None:
        self._ping_timer = None
        if self._done.is_set():
            return
        try:
            self._ping_opaque = self.session.send_ping()
        except MuxError:
            return
        self.wake_writer()
        self._pong_deadline = self._loop.call_later(self.ping_timeout, self._ping_timed_out)

    def _ping_timed_out(self) -> None:
        self._pong_deadline = None
        _log.warn("tunnel ping timeout", tunnel=self.name, timeout=self.ping_timeout)
        self._abort = True  # the peer reads nothing: what is queued for it would stay queued
        self.close("ping timeout")

    def _ack_tick(self) -> None:
        """Reset the streams the peer left unacknowledged (see `pico.mux.acks`)."""
        self._ack_timer = None
        if self._done.is_set():
            return
        session = self.session
        streams = self.streams
        expired = self._acks.tick(lambda sid: sid in streams and not session.answered(sid))
        if expired:
            _log.warn_throttled(
                "tunnel stream not acknowledged",
                tunnel=self.name,
                streams=len(expired),
                timeout=self.ack_timeout,
            )
            for stream_id in expired:
                stream = self.forget(stream_id)
                session.reset_stream(stream_id, ResetReason.CANCELLED)
                if stream is not None:
                    stream._lost(ResetReason.UNACKNOWLEDGED)
            self.wake_writer()
        if self._acks.waiting:
            self._ack_timer = self._loop.call_later(self.ack_timeout / 2, self._ack_tick)

    def _handle_events(self) -> None:
        if self._done.is_set():
            return  # closed: streams were failed already; no new ones may start
        streams = self.streams
        for ev in self.session.events_received():
            t = type(ev)
            if t is DataReceived:
                stream = streams.get(ev.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream._dispatch(_DATA, ev.data)  # type: ignore[union-attr]

            elif t is SendWindowAvailable:
                stream = streams.get(ev.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream._dispatch(_RESUME, None)
            elif t is StreamOpened:
                stream = MuxStream(self, ev.stream_id)  # type: ignore[union-attr]
                streams[ev.stream_id] = stream  # type: ignore[union-attr]
                self._no_streams.clear()
                if self.on_stream is None:
                    stream.reset(ResetReason.REFUSED)
                else:
                    self.on_stream(stream)
            elif t is StreamEnded:
                stream = streams.get(ev.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream._dispatch(_EOF, None)
            elif t is StreamReset:
                stream = self.forget(ev.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream._lost(ev.reason)  # type: ignore[union-attr]
            elif t is StreamClosed:
                stream = self.forget(ev.stream_id)  # type: ignore[union-attr]
                if stream is not None:
                    stream._lost(None)
            elif t is PongReceived:
                barrier = self._barriers.pop(ev.opaque, None)  # type: ignore[union-attr]
                if barrier is not None and not barrier.done():
                    barrier.set_result(None)
                if ev.opaque == self._ping_opaque and self._pong_deadline is not None:  # type: ignore[union-attr]
                    self._pong_deadline.cancel()
                    self._pong_deadline = None
                    self._schedule_ping()
            elif t is GoAwayReceived:
                if self.on_goaway is not None:
                    self.on_goaway()
            elif t is StreamRefused:
                self._hit_limit(ev.limit)  # type: ignore[union-attr]
            elif isinstance(ev, StreamAccepted):
                stream = streams.get(ev.stream_id)
                if stream is not None:
                    stream.peer_accepted()
            elif t is ConnectionTerminated:
                error = ev.error  # type: ignore[union-attr]
                _log.warn_throttled("tunnel protocol error", tunnel=self.name, error=error)
                self.close(f"protocol error: {error}")
