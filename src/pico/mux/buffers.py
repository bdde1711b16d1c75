"""The buffers tunnels read into: a few, shared by every tunnel of the process."""

from __future__ import annotations

import asyncio

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


def write_unpinned(transport: asyncio.WriteTransport, data: bytes | memoryview) -> None:
    """Write `data` (maybe a view of a read buffer) to a transport that may keep it.

    A transport keeps what it cannot send at once, and uvloop keeps the view itself: that
    would pin a whole read buffer for as long as a slow peer takes. So once the transport
    buffers, a view is copied (to its own size) first; while it does not, it goes out as is.
    """
    if type(data) is memoryview and transport.get_write_buffer_size():
        data = bytes(data)
    transport.write(data)
