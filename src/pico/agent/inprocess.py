"""A stream connected to an asyncio protocol in this process: no socket, no local port.

`StreamTransport` is an `asyncio.Transport` backed by a `MuxStream`, so any asyncio protocol
(uvicorn's HTTP and WebSocket protocols, a `StreamReaderProtocol`) runs on a stream as it would
on a TCP connection. Flow control is the stream's: `pause_reading()` stops crediting the node
(it may send at most one more window, which waits here, so memory stays bounded), and a full
send window calls the protocol's `pause_writing()`. `InProcessDialer` is the agent's `Dialer`
for it.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Callable
from typing import Any

from pico import log
from pico.mux.frame import ResetReason
from pico.mux.stream import MuxStream

_log = log.get_logger("agent")

# What the transport reports as its peer: the node. Every byte on a stream comes from a Pico
# node, so this one name is what a proxy-headers middleware is told to trust, whatever the
# node's address (which on one host may equal a client's).
NODE_PEER = ("pico-node", 0)


class _State(enum.Enum):
    OPEN = "open"  # both ways
    CLOSING = "closing"  # close()/abort() called: connection_lost() is on its way
    CLOSED = "closed"  # connection_lost() delivered


class _Held(enum.Enum):
    """What arrived while reading was paused, besides data."""

    EOF = "eof"
    LOST = "lost"


class StreamTransport(asyncio.Transport):
    """An asyncio transport over one mux stream, for a protocol in this process.

    It is also the stream's receiver. Safe to use only from the loop's thread.
    """

    def __init__(
        self,
        stream: MuxStream,
        protocol: asyncio.BaseProtocol,
        on_done: Callable[[], None],
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__({"peername": NODE_PEER, "sockname": None, **(extra or {})})
        self._stream = stream
        self._protocol = protocol
        self._on_done = on_done
        self._state = _State.OPEN
        self._reading_paused = False
        # Held while reading is paused: bounded by the stream's receive window, because the
        # node is not credited for it until it is delivered.
        self._held: deque[bytes | _Held] = deque()
        self._lost_reason: ResetReason | None = None
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        """Tell the protocol it is connected, then deliver what the stream already has."""
        self._stream.accept()  # connected: a deferred ACK (tcp endpoints) goes out first
        try:
            self._protocol.connection_made(self)
        except Exception as exc:
            self._protocol_failed("connection_made", exc)
        self._stream.set_receiver(self)

    # -- asyncio.Transport -------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state is _State.OPEN and data:
            self._stream.write(bytes(data) if isinstance(data, bytearray) else data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        if self._state is _State.OPEN:
            self._stream.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return self._stream.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0)  # the stream's send window is the limit

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Ignored: the stream pauses the protocol when the node's window is full."""

    def pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self._stream.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        held = self._held
        while held and not self._reading_paused and self._state is not _State.CLOSED:
            item = held.popleft()
            if item is _Held.EOF:
                self._eof()
            elif item is _Held.LOST:
                self._lost()
            else:
                assert isinstance(item, bytes)
                self._deliver(item)
        if not self._reading_paused:
            self._stream.resume_reading()

    def is_reading(self) -> bool:
        return not self._reading_paused and self._state is _State.OPEN

    def is_closing(self) -> bool:
        return self._state is not _State.OPEN

    def close(self) -> None:
        """Half-close the stream after the queued bytes; connection_lost(None) follows."""
        if self._state is _State.OPEN:
            self._state = _State.CLOSING
            self._stream.write_eof()
            self._loop.call_soon(self._finish, None)

    def abort(self) -> None:
        """Reset the stream (queued bytes are dropped); connection_lost(None) follows."""
        if self._state is _State.OPEN:
            self._state = _State.CLOSING
            self._stream.reset(ResetReason.CANCELLED)
            self._loop.call_soon(self._finish, None)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # -- StreamReceiver: what the stream delivers ---------------------------------------------

    def data_received(self, data: bytes | memoryview) -> None:
        if self._state is not _State.OPEN:
            # Bytes after close(): what a closed socket answers with a RST. The node learns
            # nobody reads them, instead of sending into a stream that never ends.
            self._stream.reset(ResetReason.CANCELLED)
            return
        chunk = data if type(data) is bytes else bytes(data)
        if self._reading_paused or self._held:
            self._held.append(chunk)
        else:
            self._deliver(chunk)

    def eof_received(self) -> None:
        if self._state is not _State.OPEN:
            return
        if self._reading_paused or self._held:
            self._held.append(_Held.EOF)
        else:
            self._eof()

    def connection_lost(self, reason: ResetReason | None) -> None:
        if self._state is _State.CLOSED:
            return
        self._lost_reason = reason
        if self._state is _State.OPEN and self._held and reason in (None, ResetReason.NORMAL):
            self._held.append(_Held.LOST)  # a clean end: what is held is still delivered
        else:
            self._lost()

    def pause_writing(self) -> None:
        if self._state is _State.OPEN:
            self._protocol.pause_writing()

    def resume_writing(self) -> None:
        if self._state is _State.OPEN:
            self._protocol.resume_writing()

    # -- internals ---------------------------------------------------------------------------

    def _deliver(self, chunk: bytes) -> None:
        if self._state is not _State.OPEN:
            return  # the protocol failed on an earlier chunk
        try:
            self._protocol.data_received(chunk)  # type: ignore[attr-defined]
        except Exception as exc:
            self._protocol_failed("data_received", exc)

    def _eof(self) -> None:
        if self._state is not _State.OPEN:
            return
        try:
            keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        except Exception as exc:
            self._protocol_failed("eof_received", exc)
            return
        if not keep_open:
            self.close()

    def _protocol_failed(self, callback: str, exc: Exception) -> None:
        """The protocol raised: as asyncio's transports do, this connection alone ends (the
        stream is reset, connection_lost(exc) follows). Raised on, it would reach the tunnel
        and close it with every other stream of the endpoint."""
        _log.warn_throttled(
            "in-process protocol raised; its stream is reset",
            callback=callback,
            error=f"{type(exc).__name__}: {exc}",
        )
        if self._state is _State.OPEN:
            self._state = _State.CLOSING
            self._stream.reset(ResetReason.CANCELLED)
            self._loop.call_soon(self._finish, exc)

    def _lost(self) -> None:
        reason = self._lost_reason
        clean = reason is None or reason == ResetReason.NORMAL
        self._finish(None if clean else ConnectionResetError(f"stream reset: {reason}"))

    def _finish(self, exc: Exception | None) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._held.clear()
        try:
            self._protocol.connection_lost(exc)
        except Exception as error:
            _log.warn_throttled(
                "in-process protocol raised; its stream is reset",
                callback="connection_lost",
                error=f"{type(error).__name__}: {error}",
            )
        finally:
            self._on_done()


class InProcessDialer:
    """Connects each stream to a new protocol from `protocol_factory`, in this process.

    The factory may raise ConnectionRefusedError to refuse a stream (a full backlog): the
    agent resets it as refused, and the node tries another upstream or answers 502.
    """

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        name: str = "in-process",
    ) -> None:
        self.protocol_factory = protocol_factory
        self.name = name

    @property
    def service(self) -> str:
        return self.name

    async def dial(self, stream: MuxStream, on_done: Callable[[], None]) -> None:
        """Start a protocol on `stream`; raises what the factory raises."""
        StreamTransport(stream, self.protocol_factory(), on_done).start()
