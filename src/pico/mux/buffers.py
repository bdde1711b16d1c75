"""The buffers tunnels read into: a few, shared by every tunnel of the process."""

from __future__ import annotations

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
