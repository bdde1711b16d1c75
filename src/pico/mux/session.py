"""Sans-I/O yamux session: a pure state machine multiplexing streams over one byte stream.

Feed bytes from the transport into :meth:`Session.receive_data`, read what happened from
:meth:`Session.events_received`, and write :meth:`Session.data_to_send` to the transport.
The session never does I/O, never sleeps and never looks at a clock; callers drive it.
Both peers must use the same ``initial_window`` (yamux fixes it at 256 KiB).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sized

from pico.mux.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    GoAwayReceived,
    PongReceived,
    SendWindowAvailable,
    StreamAccepted,
    StreamClosed,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamReset,
)
from pico.mux.frame import (
    HEADER,
    HEADER_SIZE,
    PROTOCOL_VERSION,
    Flags,
    FrameType,
    GoAwayCode,
    MuxProtocolError,
    ResetReason,
)

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_FRAME_PAYLOAD",
    "MAX_RECV_PAYLOAD",
    "MAX_WINDOW",
    "ConnectionTerminated",
    "DataReceived",
    "Event",
    "GoAwayReceived",
    "MuxError",
    "PongReceived",
    "SendWindowAvailable",
    "Session",
    "StreamAccepted",
    "StreamClosed",
    "StreamEnded",
    "StreamOpened",
    "StreamRefused",
    "StreamReset",
]

DEFAULT_WINDOW = 256 * 1024
MAX_WINDOW = 16 * 1024 * 1024
MAX_FRAME_PAYLOAD = 256 * 1024  # we never send DATA frames larger than this (one initial window)
MAX_RECV_PAYLOAD = 16 * 1024 * 1024  # a DATA frame announcing more than this is an error
# A payload the caller writes itself (send_sized) is not copied into the output: bigger
# frames only mean fewer of them. Well under what any peer accepts (MAX_RECV_PAYLOAD).
MAX_SIZED_PAYLOAD = 1024 * 1024
_MAX_U32 = 0xFFFFFFFF
_FRAME_START = HEADER_SIZE + 1  # the longest piece ever buffered: an RST header and reason
# A side that accepts no streams from its peer (the node: only it opens streams) refuses
# this many SYNs, each with an RST and no state, then treats the next as a protocol error:
# a peer that keeps opening streams it was refused is flooding, not racing a GoAway.
MAX_REFUSED_SYNS = 8

_DATA = int(FrameType.DATA)
_WINDOW_UPDATE = int(FrameType.WINDOW_UPDATE)
_PING = int(FrameType.PING)
_GO_AWAY = int(FrameType.GO_AWAY)
_SYN = int(Flags.SYN)
_ACK = int(Flags.ACK)
_FIN = int(Flags.FIN)
_RST = int(Flags.RST)

_pack = HEADER.pack
_unpack_from = HEADER.unpack_from
_RESET_REASONS = {int(r): r for r in ResetReason}


class MuxError(Exception):
    """A local API misuse: the session is closed, the stream is unknown/ended, etc."""


class _Stream:
    __slots__ = (
        "ack_due",
        "ack_wanted",
        "acked",
        "answered",
        "fin_pending",
        "fin_received",
        "fin_sent",
        "pending_credit",
        "queue",
        "queued",
        "recv_avail",
        "recv_window",
        "send_window",
        "stream_id",
        "unconsumed",
        "window_wait",
    )

    def __init__(self, stream_id: int, window: int) -> None:
        self.stream_id = stream_id
        # The peer has seen the stream: it opened it, or it acknowledged our SYN.
        self.acked = True
        # The peer read our SYN: it acknowledged it, or said it is still deciding (a window
        # update without flags, before its ACK: see Session.accept_stream).
        self.answered = True
        self.ack_wanted = False  # report_ack(): emit StreamAccepted when the ACK comes
        self.ack_due = False  # a stream the peer opened, not acknowledged yet (defer_acks)
        self.send_window = window  # bytes we may still send before the peer credits more
        self.queue: deque[memoryview] = deque()  # unsent data waiting for window
        self.queued = 0  # total bytes in ``queue``
        self.fin_pending = False  # end_stream() called
        self.fin_sent = False
        self.fin_received = False
        self.recv_window = window  # current receive window size (grows)
        self.recv_avail = window  # bytes the peer may still send us
        self.unconsumed = 0  # delivered to the app, not yet consumed
        self.pending_credit = 0  # consumed, not yet credited via WINDOW_UPDATE
        self.window_wait = False  # want_window() was called: report the next credit


class Session:
    """One side of a yamux connection. ``client=True`` for the agent (odd stream ids).

    Limits on what the peer may make us hold: ``max_streams`` streams it opened at once (a
    SYN beyond is refused with RST(REFUSED) and no state), or none at all with
    ``accept_streams=False`` (after ``MAX_REFUSED_SYNS`` refusals, a protocol error).

    With ``defer_acks``, a stream the peer opens is not acknowledged at once: the session
    answers its SYN with a bare window update (read, deciding) and sends the ACK only on
    :meth:`accept_stream`, so the opener learns whether the stream was taken (an agent that
    acknowledges only once its service connection is up, or resets with the dial's reason).
    """

    def __init__(
        self,
        *,
        client: bool,
        initial_window: int = DEFAULT_WINDOW,
        max_window: int = MAX_WINDOW,
        max_streams: int = _MAX_U32,
        accept_streams: bool = True,
        defer_acks: bool = False,
    ) -> None:
        """Create a session. Raises ``ValueError`` on nonsensical window sizes or limits."""
        if initial_window <= 0 or initial_window > _MAX_U32:
            raise ValueError("initial_window must be in 1..2**32-1")
        if max_window < initial_window:
            raise ValueError("max_window must be >= initial_window")
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self._client = client
        self._max_streams = max_streams
        self._accept_streams = accept_streams
        self._defer_acks = defer_acks
        self._peer_streams = 0  # live streams the peer opened
        self._refused = 0  # SYNs refused
        # Control frames queued so far in answer to the peer: PING acks, SYN ACKs, RSTs
        # refusing its SYNs, WINDOW_UPDATEs crediting what it sent. Read-only for callers,
        # who compare it over time to see a peer that makes us answer without reading the
        # answers (a ping or reset flood). An attribute, not a property: read per flush.
        self.control_replies = 0
        self._initial_window = initial_window
        self._max_window = max_window
        self._next_id = 1 if client else 2
        self._peer_parity = 0 if client else 1
        self._highest_peer_id = 0
        self._streams: dict[int, _Stream] = {}
        self._inbuf = bytearray()  # a cut frame start (fewer than _FRAME_START bytes)
        # The DATA frame whose payload is arriving: bytes still to come, its stream (None
        # when they are dropped) and whether it carries FIN.
        self._payload_left = 0
        self._payload_stream: _Stream | None = None
        self._payload_fin = False
        self._out: list[bytes | memoryview] = []
        self._events: list[Event] = []
        self._closed = False
        self._going_away = False
        self._peer_going_away = False
        self._ping_seq = 0

    # ------------------------------------------------------------------ properties

    @property
    def closed(self) -> bool:
        """True after :meth:`close` or a protocol error."""
        return self._closed

    @property
    def going_away(self) -> bool:
        """True once we queued a GO_AWAY (or hit a protocol error)."""
        return self._going_away

    @property
    def peer_going_away(self) -> bool:
        """True once the peer sent GO_AWAY."""
        return self._peer_going_away

    @property
    def stream_count(self) -> int:
        """Number of streams with live state."""
        return len(self._streams)

    @property
    def refused_streams(self) -> int:
        """SYNs from the peer refused so far (over ``max_streams``, or not accepted at all)."""
        return self._refused

    def acknowledged(self, stream_id: int) -> bool:
        """True once the peer acknowledged a stream we opened (always for streams it opened);
        False for an unknown stream."""
        st = self._streams.get(stream_id)
        return st is not None and st.acked

    def answered(self, stream_id: int) -> bool:
        """True once the peer read the SYN of a stream we opened: it acknowledged it, or said
        it is still deciding (see ``defer_acks``); always for streams it opened. False for an
        unknown stream."""
        st = self._streams.get(stream_id)
        return st is not None and st.answered

    def report_ack(self, stream_id: int) -> bool:
        """Emit :class:`StreamAccepted` when the peer acknowledges this stream we opened.

        Returns False, and emits nothing, if it already has (or the stream is unknown).
        """
        st = self._streams.get(stream_id)
        if st is None or st.acked:
            return False
        st.ack_wanted = True
        return True

    def accept_stream(self, stream_id: int) -> None:
        """Acknowledge a stream the peer opened whose ACK was deferred (``defer_acks``).

        Call it before sending anything on the stream. Idempotent; a no-op for a stream
        already acknowledged, unknown or reset (reset it instead to refuse it).
        """
        st = self._streams.get(stream_id)
        if st is None or not st.ack_due:
            return
        st.ack_due = False
        self.control_replies += 1
        self._out.append(_pack(PROTOCOL_VERSION, _WINDOW_UPDATE, _ACK, stream_id, 0))

    def stream_ids(self) -> list[int]:
        """Ids of the streams with live state, in opening order."""
        return list(self._streams)

    # ------------------------------------------------------------------ I/O boundary

    def events_received(self) -> list[Event]:
        """Return and clear the pending events."""
        events = self._events
        self._events = []
        return events

    def data_to_send(self) -> bytes:
        """Return and clear all pending outgoing bytes (``b""`` when none)."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out = []
        return data

    def take_output(self) -> list[bytes | memoryview]:
        """Return and clear the pending outgoing pieces without joining them (no copy).

        Concatenated in order, they equal what :meth:`data_to_send` would have returned.
        """
        out, self._out = self._out, []
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the transport, split anywhere.

        DATA payloads are delivered as they arrive, as views on ``data`` (no copy), so a
        frame split over several calls yields several :class:`DataReceived` events. A
        writable buffer (a bytearray or a view on one) is copied first: delivered views
        must never change under the application.

        Never raises on bad peer input: a protocol violation produces
        :class:`ConnectionTerminated`, closes the session and queues GO_AWAY(protocol error).
        Ignored once the session is closed.
        """
        if self._closed or not data:
            return
        view = memoryview(data)
        if not view.readonly:
            view = memoryview(bytes(view))
        try:
            inbuf = self._inbuf
            if inbuf:
                # A frame start (header, maybe an RST reason) was cut: complete it from the
                # front of `data`, parse the joined few bytes, then go on in `data` itself.
                have = len(inbuf)
                take = min(len(view), _FRAME_START - have)
                head = bytes(inbuf) + view[:take]
                used = self._parse(memoryview(head))
                if used <= have:  # still incomplete: everything given fits in the buffer
                    inbuf[have:] = view[:take]
                    return
                inbuf.clear()
                view = view[used - have :]
            used = self._parse(view)
            if used < len(view):
                inbuf += view[used:]  # a cut frame start: fewer than _FRAME_START bytes
        except MuxProtocolError as exc:
            self._fail(str(exc))
        if self._closed:
            self._inbuf.clear()

    # ------------------------------------------------------------------ local actions

    def open_stream(self) -> int:
        """Allocate a new local stream id and queue its SYN.

        Raises :class:`MuxError` if the session is closed, either side sent GO_AWAY, or
        stream ids are exhausted.
        """
        if self._closed:
            raise MuxError("session is closed")
        if self._going_away:
            raise MuxError("cannot open streams after sending GO_AWAY")
        if self._peer_going_away:
            raise MuxError("peer sent GO_AWAY; no new streams accepted")
        stream_id = self._next_id
        if stream_id > _MAX_U32:
            raise MuxError("stream ids exhausted")
        self._next_id += 2
        st = self._streams[stream_id] = _Stream(stream_id, self._initial_window)
        st.acked = st.answered = False
        self._out.append(_pack(PROTOCOL_VERSION, _WINDOW_UPDATE, _SYN, stream_id, 0))
        return stream_id

    def send(self, stream_id: int, data: bytes | memoryview) -> None:
        """Queue ``data`` on the stream and frame as much as the send window allows now.

        The rest stays queued (see :meth:`buffered`) until the peer grants credit.
        Raises :class:`MuxError` if the stream is unknown, reset, or already ended locally.
        """
        st = self._writable(stream_id)
        n = len(data)
        if n == 0:
            return
        if type(data) is not bytes:
            data = bytes(data)  # never keep a view on a caller-owned mutable buffer
        if not st.queued and n <= st.send_window and n <= MAX_FRAME_PAYLOAD:
            # Fast path: fits in one frame right now.
            st.send_window -= n
            self._out.append(_pack(PROTOCOL_VERSION, _DATA, 0, stream_id, n))
            self._out.append(data)
            return
        st.queue.append(memoryview(data))
        st.queued += n
        self._flush(st)

    def send_sized(self, stream_id: int, payload: Sized) -> None:
        """Frame `payload`, an object that is not bytes but knows its length, as one DATA frame.

        It appears in the output as it is, after its header: the caller writes it out (a
        pipe chunk is spliced). It must fit: nothing queued, at most :meth:`send_window` and
        ``MAX_SIZED_PAYLOAD`` bytes. Raises :class:`MuxError` otherwise.
        """
        st = self._writable(stream_id)
        n = len(payload)
        if st.queued or n > st.send_window or n > MAX_SIZED_PAYLOAD:
            raise MuxError(f"{n} bytes do not fit the send window of stream {stream_id}")
        st.send_window -= n
        self._out.append(_pack(PROTOCOL_VERSION, _DATA, 0, stream_id, n))
        self._out.append(payload)  # type: ignore[arg-type]

    def send_window(self, stream_id: int) -> int:
        """Bytes the stream may send now (0 if unknown)."""
        st = self._streams.get(stream_id)
        return st.send_window if st is not None else 0

    def want_window(self, stream_id: int) -> None:
        """Emit :class:`SendWindowAvailable` when the peer next credits the stream."""
        st = self._streams.get(stream_id)
        if st is not None:
            st.window_wait = True

    def _writable(self, stream_id: int) -> _Stream:
        st = self._streams.get(stream_id)
        if st is None:
            raise MuxError(f"stream {stream_id} is not open")
        if st.fin_pending:
            raise MuxError(f"stream {stream_id} was ended locally")
        return st

    def buffered(self, stream_id: int) -> int:
        """Bytes queued on the stream but not yet framed (waiting for window); 0 if unknown."""
        st = self._streams.get(stream_id)
        return st.queued if st is not None else 0

    def end_stream(self, stream_id: int) -> None:
        """Half-close: send FIN once all queued data is framed. Idempotent; no-op if unknown.

        Emits :class:`StreamClosed` right away if the peer had already ended its side and
        nothing is queued.
        """
        st = self._streams.get(stream_id)
        if st is None or st.fin_pending:
            return
        st.fin_pending = True
        if not st.queued:
            st.fin_sent = True
            self._out.append(_pack(PROTOCOL_VERSION, _WINDOW_UPDATE, _FIN, stream_id, 0))
            self._maybe_finished(st)

    def reset_stream(self, stream_id: int, reason: ResetReason = ResetReason.NORMAL) -> None:
        """Send RST (with a reason byte unless NORMAL), drop queued data, free the stream and
        emit :class:`StreamClosed`. No-op on unknown streams."""
        st = self._streams.pop(stream_id, None)
        if st is None:
            return
        self._freed(stream_id)
        self._queue_rst(stream_id, reason)
        st.queue.clear()
        st.queued = 0
        self._events.append(StreamClosed(stream_id))

    def consume(self, stream_id: int, n: int) -> None:
        """Tell the session the application processed ``n`` received bytes.

        Once consumed-but-uncredited bytes reach half the receive window a WINDOW_UPDATE is
        sent; if the application had no unconsumed backlog at that moment the window doubles
        (up to ``max_window``). No-op for unknown streams or ``n <= 0``.
        """
        st = self._streams.get(stream_id)
        if st is None or n <= 0:
            return
        if n > st.unconsumed:
            n = st.unconsumed  # be lenient about over-consuming
        st.unconsumed -= n
        st.pending_credit += n
        if st.pending_credit < st.recv_window >> 1 or st.fin_received:
            return
        increment = st.pending_credit
        if st.unconsumed == 0 and st.recv_window < self._max_window:
            grown = min(st.recv_window * 2, self._max_window)
            increment += grown - st.recv_window
            st.recv_window = grown
        st.pending_credit = 0
        st.recv_avail += increment
        self.control_replies += 1
        self._out.append(_pack(PROTOCOL_VERSION, _WINDOW_UPDATE, 0, stream_id, increment))

    def send_ping(self) -> int:
        """Queue a PING request and return its opaque value (matched by :class:`PongReceived`).

        Raises :class:`MuxError` if the session is closed.
        """
        if self._closed:
            raise MuxError("session is closed")
        self._ping_seq = (self._ping_seq % _MAX_U32) + 1
        self._out.append(_pack(PROTOCOL_VERSION, _PING, _SYN, 0, self._ping_seq))
        return self._ping_seq

    def go_away(self, code: int = GoAwayCode.NORMAL) -> None:
        """Queue GO_AWAY once. Afterwards :meth:`open_stream` raises and incoming SYNs are
        refused with RST(REJECTED); existing streams continue. No-op if closed."""
        if self._going_away or self._closed:
            return
        self._going_away = True
        self._out.append(_pack(PROTOCOL_VERSION, _GO_AWAY, 0, 0, code))

    def close(self) -> None:
        """Mark the session closed and emit :class:`StreamClosed` for every live stream.

        Already-queued output stays available from :meth:`data_to_send`; nothing new is
        produced afterwards. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._drop_all_streams()

    # ------------------------------------------------------------------ internals

    def _drop_all_streams(self) -> None:
        self._events.extend(StreamClosed(sid) for sid in self._streams)
        self._streams.clear()
        self._peer_streams = 0

    def _freed(self, stream_id: int) -> None:
        """A stream's state was dropped: count it off the peer's streams if it opened it."""
        if stream_id & 1 == self._peer_parity:
            self._peer_streams -= 1

    def _fail(self, message: str) -> None:
        if self._closed:
            return
        self._out.append(_pack(PROTOCOL_VERSION, _GO_AWAY, 0, 0, int(GoAwayCode.PROTOCOL_ERROR)))
        self._going_away = True
        self._closed = True
        self._drop_all_streams()
        self._events.append(ConnectionTerminated(message))

    def _queue_rst(self, stream_id: int, reason: ResetReason) -> None:
        if reason == ResetReason.NORMAL:
            self._out.append(_pack(PROTOCOL_VERSION, _DATA, _RST, stream_id, 0))
        else:
            self._out.append(_pack(PROTOCOL_VERSION, _DATA, _RST, stream_id, 1))
            self._out.append(bytes((int(reason),)))

    def _maybe_finished(self, st: _Stream) -> None:
        if st.fin_sent and st.fin_received:
            del self._streams[st.stream_id]
            self._freed(st.stream_id)
            self._events.append(StreamClosed(st.stream_id))

    def _flush(self, st: _Stream) -> None:
        """Frame queued data within the send window; send FIN when drained and pending."""
        out = self._out
        queue = st.queue
        sid = st.stream_id
        while st.queued and st.send_window > 0:
            n = min(st.queued, st.send_window, MAX_FRAME_PAYLOAD)
            flags = 0
            if n == st.queued and st.fin_pending:
                flags = _FIN
                st.fin_sent = True
            out.append(_pack(PROTOCOL_VERSION, _DATA, flags, sid, n))
            st.queued -= n
            st.send_window -= n
            remaining = n
            while remaining:
                chunk = queue[0]
                size = len(chunk)
                if size <= remaining:
                    queue.popleft()
                    out.append(chunk)
                    remaining -= size
                else:
                    out.append(chunk[:remaining])
                    queue[0] = chunk[remaining:]
                    remaining = 0
        if st.fin_sent:
            self._maybe_finished(st)

    def _parse(self, view: memoryview) -> int:
        """Handle the frames in ``view``; return the number of bytes used.

        DATA payloads are delivered piece by piece as they arrive. Only a cut frame start
        (a header, or an RST frame's reason byte) is left unused for the caller to keep.
        """
        pos = 0
        end = len(view)
        while pos < end:
            left = self._payload_left
            if left:
                n = end - pos
                if n > left:
                    n = left
                self._deliver(view[pos : pos + n], left - n)
                pos += n
                continue
            if end - pos < HEADER_SIZE:
                break
            version, ftype, flags, sid, length = _unpack_from(view, pos)
            if version != PROTOCOL_VERSION:
                raise MuxProtocolError(f"unsupported protocol version {version} (expected 0)")
            if ftype == _DATA:
                if length > MAX_RECV_PAYLOAD:
                    raise MuxProtocolError(
                        f"DATA frame length {length} exceeds the maximum {MAX_RECV_PAYLOAD}"
                    )
                if flags & _RST:
                    if length > 1:
                        raise MuxProtocolError(
                            f"RST frame carries {length} bytes (at most 1 allowed)"
                        )
                    if end - pos < HEADER_SIZE + length:
                        break
                    reason = view[pos + HEADER_SIZE] if length else int(ResetReason.NORMAL)
                    pos += HEADER_SIZE + length
                    self._on_stream_frame(ftype, flags, sid, length, reason)
                    continue
                pos += HEADER_SIZE
                self._on_stream_frame(ftype, flags, sid, length, 0)
            elif ftype == _WINDOW_UPDATE:
                pos += HEADER_SIZE
                self._on_stream_frame(ftype, flags, sid, length, 0)
            elif ftype == _PING:
                pos += HEADER_SIZE
                self._on_ping(flags, sid, length)
            elif ftype == _GO_AWAY:
                pos += HEADER_SIZE
                if sid != 0:
                    raise MuxProtocolError(f"GO_AWAY frame on stream {sid} (must be 0)")
                if not self._peer_going_away:
                    self._peer_going_away = True
                    self._events.append(GoAwayReceived(length))
            else:
                raise MuxProtocolError(f"unknown frame type {ftype}")
        return pos

    def _deliver(self, piece: memoryview, left: int) -> None:
        """The next bytes of the DATA frame being received; ``left`` bytes of it follow."""
        self._payload_left = left
        st = self._payload_stream
        if st is not None and st.stream_id in self._streams:
            st.unconsumed += len(piece)
            self._events.append(DataReceived(st.stream_id, piece))
            if not left and self._payload_fin:
                self._on_fin(st)
        if not left:
            self._payload_stream = None

    def _on_ping(self, flags: int, sid: int, opaque: int) -> None:
        if sid != 0:
            raise MuxProtocolError(f"PING frame on stream {sid} (must be 0)")
        if flags & _SYN:
            self.control_replies += 1
            self._out.append(_pack(PROTOCOL_VERSION, _PING, _ACK, 0, opaque))
        elif flags & _ACK:
            self._events.append(PongReceived(opaque))
        else:
            raise MuxProtocolError("PING frame without SYN or ACK flag")

    def _seen(self, sid: int) -> bool:
        """Whether ``sid`` was ever opened (by either side)."""
        if sid & 1 == self._peer_parity:
            return sid <= self._highest_peer_id
        return sid < self._next_id

    def _on_stream_frame(self, ftype: int, flags: int, sid: int, length: int, reason: int) -> None:
        """A DATA or WINDOW_UPDATE header (``reason``: an RST frame's reason byte).

        A DATA frame's payload follows through :meth:`_deliver`; its FIN applies after it.
        """
        if sid == 0:
            raise MuxProtocolError(f"{FrameType(ftype).name} frame on stream 0")
        st = self._streams.get(sid)
        data = ftype == _DATA and not flags & _RST
        if data:
            self._payload_left = length  # the payload is consumed even when it is dropped
        if flags & _SYN:
            if sid & 1 != self._peer_parity:
                raise MuxProtocolError(f"SYN for stream {sid} has the wrong parity for the peer")
            if st is not None or sid <= self._highest_peer_id:
                raise MuxProtocolError(f"SYN reuses stream id {sid}")
            self._highest_peer_id = sid
            if not self._accept_streams:
                self._refuse(sid)
                return
            if self._going_away:
                self.control_replies += 1
                self._queue_rst(sid, ResetReason.REJECTED)
                return
            if self._peer_streams >= self._max_streams:
                self._refuse(sid)
                return
            st = _Stream(sid, self._initial_window)
            self._streams[sid] = st
            self._peer_streams += 1
            self.control_replies += 1
            if self._defer_acks:
                # Read, not taken yet: the opener knows we are alive (its ack timeout must
                # not count a slow decision as a frozen peer); accept_stream() sends the ACK.
                st.ack_due = True
                self._out.append(_pack(PROTOCOL_VERSION, _WINDOW_UPDATE, 0, sid, 0))
            else:
                self._out.append(_pack(PROTOCOL_VERSION, _WINDOW_UPDATE, _ACK, sid, 0))
            self._events.append(StreamOpened(sid))
        elif st is None:
            if self._seen(sid):
                return  # late frame for a stream we already closed/reset: ignore (race)
            raise MuxProtocolError(f"{FrameType(ftype).name} frame for stream {sid} never opened")
        elif flags & _ACK:
            st.acked = st.answered = True
            if st.ack_wanted:
                self._events.append(StreamAccepted(sid))

        if flags & _RST:
            del self._streams[sid]
            self._freed(sid)
            st.queue.clear()
            st.queued = 0
            self._events.append(StreamReset(sid, _RESET_REASONS.get(reason, ResetReason.NORMAL)))
            self._events.append(StreamClosed(sid))
            return

        if data:
            if length:
                if st.fin_received:
                    raise MuxProtocolError(f"DATA on stream {sid} after the peer's FIN")
                if length > st.recv_avail:
                    raise MuxProtocolError(
                        f"peer exceeded receive window on stream {sid} "
                        f"({length} bytes, {st.recv_avail} allowed)"
                    )
                st.recv_avail -= length
                self._payload_stream = st
                self._payload_fin = bool(flags & _FIN)
                return  # FIN, if any, once the payload is in
        elif length:
            window = st.send_window + length
            if window > _MAX_U32:
                raise MuxProtocolError(f"window overflow on stream {sid}")
            st.send_window = window
            if st.queued:
                self._flush(st)
                if not st.queued and not st.fin_pending:
                    self._events.append(SendWindowAvailable(sid))
            elif st.window_wait:
                st.window_wait = False
                self._events.append(SendWindowAvailable(sid))
        else:
            # A window update without credit: an ACK, a FIN, or (before the ACK of a stream
            # we opened) the peer saying it read the SYN and is still deciding.
            st.answered = True

        if flags & _FIN:
            self._on_fin(st)

    def _refuse(self, sid: int) -> None:
        """Answer a SYN we will not serve with RST(REFUSED), keeping no state for it.

        Its payload, if it came with DATA, is dropped (`_seen` ignores late frames for it).
        """
        self._refused += 1
        if not self._accept_streams and self._refused > MAX_REFUSED_SYNS:
            raise MuxProtocolError(
                f"peer opened {self._refused} streams; this side accepts none "
                f"(at most {MAX_REFUSED_SYNS} are refused before this error)"
            )
        self.control_replies += 1
        self._queue_rst(sid, ResetReason.REFUSED)
        limit = "accept_streams" if not self._accept_streams else "max_streams"
        self._events.append(StreamRefused(sid, limit))

    def _on_fin(self, st: _Stream) -> None:
        if not st.fin_received:
            st.fin_received = True
            self._events.append(StreamEnded(st.stream_id))
            if st.stream_id in self._streams:
                self._maybe_finished(st)
