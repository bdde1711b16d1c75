"""One stream of the agent, spliced to one TCP connection to the local service.

`ServiceSide` is the service connection: its bytes go to the stream. `StreamSide` receives the
stream: its bytes go to the service. `SplicedServiceSide` (Linux, a tunnel that splices) moves
the service's bytes to the tunnel with splice(2), never reading them into Python.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, cast

from pico.mux import splice
from pico.mux.buffers import write_unpinned
from pico.mux.frame import ResetReason
from pico.mux.session import MAX_SIZED_PAYLOAD
from pico.mux.stream import MuxStream

# Reads up to this size are copied (one syscall, and they share the tunnel's next write with
# other streams); a read that fills it switches the connection to splicing until one does not.
SMALL_READ = 64 * 1024


class ServiceSide(asyncio.Protocol):
    """The TCP connection to the local service, spliced to one stream."""

    def __init__(self, stream: MuxStream, on_done: Any) -> None:
        self.stream = stream
        self.on_done = on_done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.stream.accept()  # connected: a deferred ACK goes out before any service byte
        self.stream.set_receiver(StreamSide(self))

    def data_received(self, data: bytes) -> None:
        self.stream.write(data)

    def eof_received(self) -> bool:
        self.stream.write_eof()
        # The request may still be arriving: keep our side open. Not over TLS, which cannot
        # half-close: the transport closes anyway, and asyncio logs a warning for a True.
        transport = self.transport
        return transport is not None and transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.stream.closed:
            if exc is None:
                self.stream.write_eof()
            else:
                # Not a dial-failure reason: the service may have acted on the request, so
                # the node must not replay it on another upstream.
                self.stream.reset(ResetReason.CANCELLED)
        self.on_done()

    def pause_writing(self) -> None:
        self.stream.pause_reading()

    def resume_writing(self) -> None:
        self.stream.resume_reading()

    def pause_source(self) -> None:
        """The stream cannot take more (window or tunnel full): stop reading the service."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_source(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()


class SplicedServiceSide(ServiceSide):
    """A service connection whose bytes reach the tunnel by splice(2), never read into Python.

    The loop's transport still writes the request to the service; reading goes through a
    duplicate descriptor: socket -> pipe -> tunnel socket (see pico.mux.splice).
    """

    def __init__(self, stream: MuxStream, on_done: Any) -> None:
        super().__init__(stream, on_done)
        self._loop = asyncio.get_running_loop()
        self._fd = -1
        self._in_flight: splice.Pipe | None = None  # the pipe of the chunk on its way
        self._bulk = False  # the last read was full: splice the next bytes
        self._paused = False
        self._reading = False
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Splice reads, the loop must not. uvloop starts reading right after this method
        # returns, whatever it was told here: pause again before its first poll.
        reader = cast(asyncio.Transport, transport)
        reader.pause_reading()
        self._loop.call_soon(reader.pause_reading)
        sock = transport.get_extra_info("socket")
        self._fd = os.dup(sock.fileno())
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        # The loop read before its pause took effect: these bytes go first, as bytes (the
        # stream then pauses the splice until they are framed).
        if self.transport is not None:
            self.transport.pause_reading()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._unwatch()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().connection_lost(exc)

    def pause_source(self) -> None:
        self._paused = True
        self._unwatch()

    def resume_source(self) -> None:
        self._paused = False
        self._watch()

    def _watch(self) -> None:
        if self._reading or self._fd < 0 or self._eof or self._paused or self._in_flight:
            return
        self._loop.add_reader(self._fd, self._readable)
        self._reading = True

    def _unwatch(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _chunk_sent(self) -> None:
        self._in_flight = None
        self._watch()

    def _readable(self) -> None:
        stream = self.stream
        pipes = stream.tunnel.pipes
        if stream.closed or pipes is None:
            self._unwatch()
            return
        if self._in_flight is not None or stream.get_write_buffer_size():
            self._unwatch()  # watched again once the chunk is out, or the stream resumes
            return
        window = stream.send_window()
        if window <= 0 or stream.tunnel.write_blocked:
            self._unwatch()
            stream.pause_if_blocked()  # resume_source() follows
            return
        if not self._bulk:
            self._read_small()
            return
        try:
            pipe = pipes.take()
        except OSError:  # no descriptor for a pipe (EMFILE): copy this read instead
            self._read_small()
            return
        limit = min(window, splice.PIPE_SIZE, MAX_SIZED_PAYLOAD)
        try:
            n = pipe.fill(self._fd, limit)
        except BlockingIOError:
            pipes.give(pipe)
            return
        except OSError:
            pipes.give(pipe)  # nothing moved into it
            self._broken()
            return
        if n == 0:
            pipes.give(pipe)
            self._ended()
            return
        if n < limit:
            self._bulk = False  # the service had no more: the next bytes may be few
        self._in_flight = pipe
        pipe.on_drained = self._chunk_sent
        stream.write_chunk(splice.PipeChunk(pipe, n))

    def _read_small(self) -> None:
        """Read (copy) up to SMALL_READ bytes: a small response then costs one read, and its
        bytes leave with the other streams' in one write. A full read means more is coming:
        the rest is spliced."""
        try:
            data = os.read(self._fd, SMALL_READ)
        except BlockingIOError:
            return
        except OSError:
            self._broken()
            return
        if not data:
            self._ended()
            return
        if len(data) == SMALL_READ:
            self._bulk = True
        self.stream.write(data)

    def _broken(self) -> None:
        # The service broke the connection mid-response: never replayed elsewhere.
        self._unwatch()
        self.stream.reset(ResetReason.CANCELLED)
        if self.transport is not None:
            self.transport.abort()

    def _ended(self) -> None:
        self._eof = True
        self._unwatch()
        self.stream.write_eof()


class StreamSide:
    """Receiver of the stream: writes into the service connection."""

    __slots__ = ("service",)

    def __init__(self, service: ServiceSide) -> None:
        self.service = service

    def data_received(self, data: bytes | memoryview) -> None:
        transport = self.service.transport
        if transport is not None:
            write_unpinned(transport, data)  # kept until the service reads: not a view

    def eof_received(self) -> None:
        t = self.service.transport
        if t is not None and t.can_write_eof():
            t.write_eof()

    def connection_lost(self, reason: ResetReason | None) -> None:
        t = self.service.transport
        if t is not None:
            if reason is None or reason == ResetReason.NORMAL:
                t.close()  # the node is done with the connection: let queued bytes out
            else:
                t.abort()

    def pause_writing(self) -> None:
        self.service.pause_source()

    def resume_writing(self) -> None:
        self.service.resume_source()
