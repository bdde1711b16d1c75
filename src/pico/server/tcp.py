"""TCP endpoints on the proxy port: `GET /_pico/v1/tcp/{endpoint_id}` bridged to a tunnel stream.

A TCP endpoint's tunnel hands the proxy engine a `WebSocketBridge` instead of a bare stream.
The engine sends it the client's upgrade request as it would to any service; the bridge
answers the 101 itself (the agent on the other side only splices bytes), and from then on the
engine splices the client connection to it: the client's WebSocket frames are decoded into
stream bytes, and the stream's bytes go back as binary frames. So routing, auth, forwarding
to the node that holds the endpoint and holding during failover are the HTTP engine's own.

The 101 waits for the agent to reach the service: the agent acknowledges the stream only once
its dial succeeded, and resets it with the dial's failure otherwise (REFUSED, UNREACHABLE,
TIMEOUT). A reset before the ACK reaches the engine as that reason, before any response byte:
a dial failure, which it retries on another upstream or answers 502/504 as for HTTP.

Half-close: a Close frame from the client ends the stream's direction to the service (the
service reads EOF); the service's EOF becomes a Close frame (1000) to the client, which may
keep sending. The connection ends when both directions have.
"""

from __future__ import annotations

import asyncio
import enum
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import httptools

from pico import log
from pico.http.channel import ChannelReceiver, ResetReason
from pico.http.head import error_response
from pico.http.request import TCP_PATH
from pico.mux.upgrade import accept_response
from pico.mux.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameDecoder,
    PongCoalescer,
    WebSocketError,
    encode_frame,
    frame_header,
    join_small,
)

# One client frame may carry at most this much: the payload is relayed piece by piece as it
# arrives (never reassembled), so this bounds nothing in memory, only a peer's nonsense.
_MAX_FRAME = 1 << 62
# A payload up to this size is joined with its frame header (one write to the client); a
# bigger one goes out as it is, with the header in one writelines() where the receiver has it
# (the proxy engine's splice does), else after it (copying it would cost more than a write).
_JOIN_LIMIT = 16 * 1024
# Close codes (RFC 6455 §7.4.1).
_NORMAL = 1000
_PROTOCOL_ERROR = 1002
_SERVICE_GONE = 1011

_access = log.get_logger("proxy.tcp.access")
_log = log.get_logger("proxy.tcp")


@dataclass(frozen=True, slots=True)
class TcpRecord:
    """One finished TCP connection: what the access log and the metrics see."""

    endpoint: str
    client: str
    bytes_in: int  # client -> service
    bytes_out: int  # service -> client
    duration: float
    reason: str


class TcpObserver(Protocol):
    """Told when a TCP connection through the bridge opens and when it ends."""

    def tcp_opened(self) -> None: ...
    def tcp_closed(self, record: TcpRecord) -> None:
        """The connection ended (its bytes are counted now, not as they flow)."""


class State(enum.Enum):
    """HEAD until the engine's request head is in, CONNECTING until the agent acknowledged
    the stream (its service connection is up), OPEN while bytes flow, CLOSED after."""

    HEAD = "head"
    CONNECTING = "connecting"
    OPEN = "open"
    CLOSED = "closed"


class _Head:
    """The request head the engine writes, parsed just enough to answer it."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.key = ""
        self.forwarded_for = ""
        self.complete = False
        self.rest = b""

    def feed(self, data: bytes | memoryview) -> None:
        """Raises httptools.HttpParserError for input that is no request head."""
        try:
            self.parser.feed_data(bytes(data))
        except httptools.HttpParserUpgrade as exc:
            self.complete = True
            self.rest = bytes(data)[exc.args[0] :]

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"sec-websocket-key":
            self.key = value.decode("latin-1")
        elif lname == b"x-forwarded-for":
            self.forwarded_for = value.decode("latin-1")

    def on_message_complete(self) -> None:
        self.complete = True  # a request that is no upgrade (an HTTP request)

    @property
    def client(self) -> str:
        """Who the engine says the client is (the last X-Forwarded-For entry)."""
        return self.forwarded_for.rsplit(",", 1)[-1].strip()


class BridgedStream(Protocol):
    """What the bridge needs of its tunnel stream (a `MuxStream`)."""

    @property
    def closed(self) -> bool: ...
    def when_accepted(self, callback: Callable[[], None]) -> bool: ...
    def set_receiver(self, receiver: ChannelReceiver) -> None: ...
    def write(self, data: bytes | memoryview) -> None: ...
    def write_eof(self) -> None: ...
    def reset(self, reason: ResetReason = ResetReason.CANCELLED) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class WebSocketBridge:
    """A `Channel` for one `/_pico/v1/tcp` connection: a WebSocket on one side, a stream on
    the other. Also the stream's receiver."""

    def __init__(
        self,
        stream: BridgedStream,
        endpoint_id: str,
        observer: TcpObserver | None = None,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        self.stream = stream
        self.endpoint_id = endpoint_id
        self.observer = observer
        self.on_closed = on_closed
        self.state = State.HEAD
        self.receiver: ChannelReceiver | None = None
        self._writelines: Callable[[tuple[bytes | memoryview, ...]], None] | None = None
        self._head = _Head()
        self._decoder = FrameDecoder(expect_mask=True, max_frame=_MAX_FRAME)
        # A client that pings without reading must not grow its write buffer by a pong each.
        self._pongs = PongCoalescer()
        # The two directions end separately (half-close): client -> service, service -> client.
        self._client_done = False
        self._service_done = False
        self._close_sent = False
        self.bytes_in = 0
        self.bytes_out = 0
        self._started = time.monotonic()
        self._client = ""
        self._key = ""  # the client's Sec-WebSocket-Key, while CONNECTING
        self._early: list[bytes] = []  # bytes after the head, while CONNECTING
        stream.set_receiver(self)

    # -- Channel (what the proxy engine sees) ------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def set_receiver(self, receiver: ChannelReceiver) -> None:
        self.receiver = receiver
        # Optional in a ChannelReceiver: a frame header and its payload in one syscall.
        self._writelines = getattr(receiver, "writelines", None)

    def write(self, data: bytes | memoryview) -> None:
        """The engine's bytes: first the request head, then the client's WebSocket frames."""
        if self.state is State.HEAD:
            self._take_head(data)
        elif self.state is State.OPEN:
            self._from_client(data)
        elif self.state is State.CONNECTING:
            # Not expected: the engine holds what follows an upgrade head until the 101.
            self._early.append(bytes(data))

    def write_eof(self) -> None:
        """The client's TCP connection ended (without a Close frame, or after one)."""
        if self.state is State.OPEN and not self._client_done:
            self._client_done = True
            self.stream.write_eof()
            self._maybe_done()

    def reset(self, reason: ResetReason = ResetReason.CANCELLED) -> None:
        if self.state is State.CLOSED:
            return
        self.stream.reset(reason)
        self._finish("client gone" if self.state is State.OPEN else "not opened")

    def pause_reading(self) -> None:
        """The client's write buffer is full: the service is not read, pings are held."""
        self._pongs.pause()
        self.stream.pause_reading()

    def resume_reading(self) -> None:
        held = self._pongs.resume()
        if held is not None and self.state is State.OPEN:
            self._to_client(encode_frame(OP_PONG, held, mask=False))
        self.stream.resume_reading()

    # -- the request head --------------------------------------------------------------------------

    def _take_head(self, data: bytes | memoryview) -> None:
        head = self._head
        try:
            head.feed(data)
        except httptools.HttpParserError:
            self._refuse(400, "malformed request")
            return
        if not head.complete:
            return
        if not head.url.startswith(TCP_PATH) or not head.key:
            # An HTTP request reached a TCP endpoint (it registered while the request waited).
            self._refuse(400, "endpoint is tcp")
            return
        self.state = State.CONNECTING
        self._client = head.client
        self._key = head.key
        if head.rest:
            self._early.append(head.rest)
        self._head = _Head()  # nothing more to parse: drop the parser
        if not self.stream.when_accepted(self._accepted) and not self.stream.closed:
            # Acknowledged already (an agent that does not wait for its dial). Answered on
            # the next loop pass: the engine is still sending the request.
            asyncio.get_running_loop().call_soon(self._accepted)

    def _accepted(self) -> None:
        """The agent reached the service: the client gets its 101, and bytes flow."""
        if self.state is not State.CONNECTING or self.receiver is None:
            return
        self.state = State.OPEN
        self._started = time.monotonic()
        if self.observer is not None:
            self.observer.tcp_opened()
        self.receiver.data_received(accept_response(self._key))
        early, self._early = self._early, []
        for data in early:
            self._from_client(data)

    def _refuse(self, status: int, message: str) -> None:
        self.stream.reset(ResetReason.NORMAL)
        self.state = State.CLOSED
        answer = error_response(status, message, close=True)
        asyncio.get_running_loop().call_soon(self._deliver_refusal, answer)

    def _deliver_refusal(self, answer: bytes) -> None:
        receiver = self.receiver
        if receiver is not None:
            receiver.data_received(answer)
            receiver.connection_lost(None)

    # -- client -> service -------------------------------------------------------------------------

    def _from_client(self, data: bytes | memoryview) -> None:
        if self._client_done:
            return  # after its Close frame, nothing the client sends counts
        try:
            payloads, controls = self._decoder.feed(data)
        except WebSocketError as exc:
            # The client controls this: logged at most once a minute.
            _log.warn_throttled("bad websocket frame", endpoint_id=self.endpoint_id, error=str(exc))
            self._send_close(_PROTOCOL_ERROR, str(exc)[:100])
            self.stream.reset(ResetReason.PROTOCOL)
            self._finish("protocol error")
            return
        stream = self.stream
        if len(payloads) > 1:
            payloads = join_small(payloads, _JOIN_LIMIT)
        for piece in payloads:
            self.bytes_in += len(piece)
            stream.write(piece)
        for control in controls:
            if control.opcode == OP_CLOSE:
                self._client_done = True
                stream.write_eof()  # the service reads EOF; its answer may still come back
                self._maybe_done()
            elif control.opcode == OP_PING:
                pong = self._pongs.ping(control.payload)
                if pong is not None:
                    self._to_client(encode_frame(OP_PONG, pong, mask=False))

    # -- service -> client (the stream's receiver) -------------------------------------------------

    def data_received(self, data: bytes | memoryview) -> None:
        if self.state is not State.OPEN or self._close_sent:
            return
        n = len(data)
        self.bytes_out += n
        header = frame_header(OP_BINARY, n, mask_key=None)
        if n <= _JOIN_LIMIT:
            self._to_client(b"".join((header, data)))  # one write, one syscall
        elif self._writelines is not None:
            self._writelines((header, data))  # data: a view of the tunnel's read buffer
        else:
            self._to_client(header)
            self._to_client(data)  # a view of the tunnel's read buffer: not copied

    def eof_received(self) -> None:
        if self.state is not State.OPEN:
            return
        self._service_done = True
        self._send_close(_NORMAL, "")
        self._maybe_done()

    def connection_lost(self, reason: ResetReason | None) -> None:
        if self.state is State.HEAD or self.state is State.CONNECTING:
            # Before the 101: the engine sees the agent's reason (a dial failure: retried
            # elsewhere, or 502/504) as it would for an HTTP request.
            self.state = State.CLOSED
            self._notify_closed()
            if self.receiver is not None:
                self.receiver.connection_lost(reason)
            return
        if self.state is not State.OPEN:
            return
        if reason is not None and reason is not ResetReason.NORMAL:
            self._send_close(_SERVICE_GONE, _reset_text(reason))
        else:
            self._send_close(_NORMAL, "")
        self._finish("closed" if reason is None else reason.name.lower())

    def pause_writing(self) -> None:
        if self.receiver is not None:
            self.receiver.pause_writing()

    def resume_writing(self) -> None:
        if self.receiver is not None:
            self.receiver.resume_writing()

    # -- plumbing ----------------------------------------------------------------------------------

    def _to_client(self, data: bytes | memoryview) -> None:
        if self.receiver is not None:
            self.receiver.data_received(data)

    def _send_close(self, code: int, reason: str) -> None:
        if self._close_sent:
            return
        self._close_sent = True
        payload = struct.pack(">H", code) + reason.encode()[:123]
        self._to_client(encode_frame(OP_CLOSE, payload, mask=False))

    def _maybe_done(self) -> None:
        if self._client_done and self._service_done:
            # Both sides said they are done: the stream closes with both FINs; end the client's
            # connection now rather than wait for the tunnel's bookkeeping.
            self._finish("closed")

    def _finish(self, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        was_open = self.state is State.OPEN
        self.state = State.CLOSED
        if was_open:
            self._record(reason)
        self._notify_closed()
        receiver, self.receiver = self.receiver, None
        self._writelines = None
        if receiver is not None:
            receiver.connection_lost(None)

    def _notify_closed(self) -> None:
        if self.on_closed is not None:
            self.on_closed()
            self.on_closed = None

    def _record(self, reason: str) -> None:
        record = TcpRecord(
            endpoint=self.endpoint_id,
            client=self._client,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            duration=time.monotonic() - self._started,
            reason=reason,
        )
        if self.observer is not None:
            self.observer.tcp_closed(record)
        _access.info(
            "tcp connection",
            endpoint_id=record.endpoint,
            client_ip=record.client,
            bytes_in=record.bytes_in,
            bytes_out=record.bytes_out,
            duration=round(record.duration, 3),
            reason=reason,
        )


def _reset_text(reason: ResetReason) -> str:
    if reason in (ResetReason.REFUSED, ResetReason.UNREACHABLE):
        return "upstream unreachable"
    if reason is ResetReason.TIMEOUT:
        return "upstream timeout"
    return "service connection reset"
