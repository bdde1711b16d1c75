"""The buffers connections read into: a few per pool, shared by every tunnel (or forwarded
connection) of the process, and `PooledReads`, one connection's use of a pool."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# The most one read takes.
READ_SIZE = 1024 * 1024


class ReadBuffers:
    """The buffers tunnels read into, shared by every tunnel of the process.

    A read fills one buffer and hands out read-only views of it; the buffer then goes back
    and is reused once no view of it is alive (a bytearray with live views cannot be resized:
    that is the test). Idle tunnels hold none, and at most `keep` spares are kept.
    """

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self.spares: list[bytearray] = []

    def take(self) -> bytearray:
        spares = self.spares
        while spares:
            buf = spares.pop()
            try:
                buf.pop()  # raises BufferError while a view of it is alive
                buf.append(0)  # (within its allocation: neither moves the data)
            except BufferError:
                continue  # still viewed: freed with its last view
            return buf
        return bytearray(self.size)

    def give(self, buf: bytearray) -> None:
        if len(self.spares) < self.keep:
            self.spares.append(buf)


READ_BUFFERS = ReadBuffers(READ_SIZE, keep=4)


class PooledReads:
    """One connection's reads into `pool`'s buffers (for an asyncio.BufferedProtocol).

    A buffer is taken for a read and given back once its bytes were delivered; one taken for
    a read that got nothing (EOF) is kept for the next, and given back when the connection
    ends (`release`), so a finished connection holds none.
    """

    __slots__ = ("_buffer", "_pool")

    def __init__(self, pool: ReadBuffers) -> None:
        self._pool = pool
        self._buffer: bytearray | None = None

    def buffer(self) -> memoryview:
        """Where the next read goes."""
        if self._buffer is None:
            self._buffer = self._pool.take()
        return memoryview(self._buffer)

    def deliver(self, nbytes: int, to: Callable[[memoryview], None]) -> None:
        """Hand the `nbytes` read to `to`, as a read-only view: what it keeps of it pins the
        buffer (the pool does not reuse it until the view is gone)."""
        buf, self._buffer = self._buffer, None
        assert buf is not None
        try:
            to(memoryview(buf)[:nbytes].toreadonly())
        finally:
            self._pool.give(buf)

    def release(self) -> None:
        """The connection ended: give back a buffer no read filled."""
        buf, self._buffer = self._buffer, None
        if buf is not None:
            self._pool.give(buf)


def write_unpinned(transport: asyncio.WriteTransport, data: bytes | memoryview) -> None:
    """Write `data` (maybe a view of a read buffer) to a transport that may keep it.

    A transport keeps what it cannot send at once, and uvloop keeps the view itself: that
    would pin a whole read buffer for as long as a slow peer takes. So once the transport
    buffers, a view is copied (to its own size) first; while it does not, it goes out as is.
    """
    if type(data) is memoryview and transport.get_write_buffer_size():
        data = bytes(data)
    transport.write(data)
