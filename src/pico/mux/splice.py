"""Zero-copy relaying for the agent (Linux): service bytes move socket -> pipe -> tunnel socket
with splice(2), so the agent never copies a response body into Python, nor into the kernel again.

`Pipe` holds one stream's bytes in flight. `PipeChunk` is a mux DATA payload that lives in a
pipe: the session frames it like bytes, and `DirectWriter` splices it out in order with the
bytes around it. `DirectWriter` owns every write to the tunnel socket (through a duplicate of
its descriptor), since the event loop's own transport would reorder bytes written behind its
back. Reading the tunnel stays with the transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
from collections import deque
from collections.abc import Callable

from pico import log

_log = log.get_logger("mux")

_SPLICE = getattr(os, "splice", None)
_MOVE = getattr(os, "SPLICE_F_MOVE", 1)
_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# One pipe holds at most this much (the largest chunk spliced into it). Pipes of an
# unprivileged user beyond fs.pipe-user-pages-soft (64 MiB in all by default) are smaller:
# chunks shrink, nothing else changes. Pipes are pooled per tunnel, so only chunks on their
# way hold one.
PIPE_SIZE = 1024 * 1024
_IOV_MAX = 512
# A closing tunnel's queued bytes get this long to leave before they are dropped.
LINGER = 10.0
_MSG_MORE = getattr(socket, "MSG_MORE", 0)


def supported() -> bool:
    """True where splice(2) is available (Linux)."""
    return _SPLICE is not None


class Pipe:
    """A kernel pipe carrying one chunk of a stream from its service socket to the tunnel.

    `pending` counts bytes spliced in and not yet out. Once they are all out the pipe goes
    back to its pool (and `on_drained` is called); a pipe whose bytes will never be sent is
    discarded (closed), never reused.
    """

    __slots__ = ("on_drained", "pending", "pool", "read_fd", "write_fd")

    def __init__(self, pool: PipePool | None = None) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe only means smaller chunks
            fcntl.fcntl(self.write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
        self.pending = 0
        self.pool = pool
        self.on_drained: Callable[[], None] | None = None

    @property
    def closed(self) -> bool:
        return self.read_fd < 0

    def fill(self, src_fd: int, limit: int) -> int:
        """Move up to `limit` bytes from `src_fd` into the pipe; 0 at end of file.

        Raises BlockingIOError when nothing is ready, OSError on a broken source.
        """
        assert _SPLICE is not None
        n: int = _SPLICE(src_fd, self.write_fd, limit, flags=_MOVE | _NONBLOCK)
        self.pending += n
        return n

    def drained(self, n: int) -> None:
        """`n` bytes left the pipe for the socket."""
        if self.read_fd < 0:
            return  # discarded with its tunnel
        self.pending -= n
        if self.pending == 0:
            callback, self.on_drained = self.on_drained, None
            if self.pool is not None:
                self.pool.give(self)
            else:
                self.discard()
            if callback is not None:
                callback()

    def discard(self) -> None:
        """Close now: the bytes in it will never be sent (their stream or tunnel is gone)."""
        self.pending = 0
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.read_fd = self.write_fd = -1
        callback, self.on_drained = self.on_drained, None
        if callback is not None:
            callback()


class PipePool:
    """The empty pipes of one tunnel: a pipe is needed only while a chunk is on its way, so
    a few serve every stream (and an unprivileged user's pipe quota is not spent per
    stream). `close()` closes the spares; pipes out with chunks close when discarded.

    `keep` covers the chunks in flight at once under load: with 4, 50 concurrent 1 MiB
    responses made and closed a pipe per response (pipe2, F_SETPIPE_SZ, two closes: strace
    counted 1,276 pipe2 calls in 3 s); with 32, 55. A spare pipe is empty: it holds two
    descriptors and no buffer pages."""

    def __init__(self, keep: int = 32) -> None:
        self.keep = keep
        self.spares: list[Pipe] = []
        self.closed = False

    def take(self) -> Pipe:
        return self.spares.pop() if self.spares else Pipe(self)

    def give(self, pipe: Pipe) -> None:
        """An empty pipe comes back."""
        if self.closed or len(self.spares) >= self.keep:
            pipe.pool = None
            pipe.discard()
        else:
            self.spares.append(pipe)

    def close(self) -> None:
        self.closed = True
        spares, self.spares = self.spares, []
        for pipe in spares:
            pipe.pool = None
            pipe.discard()


class PipeChunk:
    """`size` bytes of a stream waiting in `pipe`: the payload of one mux DATA frame."""

    __slots__ = ("pipe", "size")

    def __init__(self, pipe: Pipe, size: int) -> None:
        self.pipe = pipe
        self.size = size

    def __len__(self) -> int:
        return self.size


Piece = bytes | memoryview | PipeChunk


class DirectWriter:
    """Writes bytes and pipe chunks to a socket in order, without the event loop's transport.

    Writes go out at once when the socket takes them; the rest waits for writability. Above
    `high` bytes waiting, `on_pause` is called (and `on_resume` once it is all out), like a
    transport's write flow control. A write error calls `on_error` once; later writes are
    dropped.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        on_error: Callable[[OSError], None],
        on_pause: Callable[[], None],
        on_resume: Callable[[], None],
        high: int,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        # A duplicate of the transport's socket (the same connection, our own descriptor).
        self._sock = socket.socket(fileno=os.dup(sock.fileno()))
        self._sock.setblocking(False)
        self._fd = self._sock.fileno()
        self._queue: deque[Piece] = deque()
        self._offset = 0  # bytes of the queue's first piece already written
        self.buffered = 0
        self._high = high
        self._paused = False
        self._watching = False
        self._on_error = on_error
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._closing: asyncio.TimerHandle | None = None  # close(drain=True) is waiting
        self._closed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def write(self, pieces: list[Piece]) -> None:
        if self._fd < 0:
            for piece in pieces:
                if type(piece) is PipeChunk:
                    piece.pipe.discard()
            return
        self._queue.extend(pieces)
        self.buffered += sum(map(len, pieces))
        if not self._watching:
            self._drain()
        if self.buffered > self._high and not self._paused:
            self._paused = True
            self._on_pause()

    def close(self, *, drain: bool = False) -> None:
        """Stop. With `drain`, a graceful close: what is queued still goes out, then our end
        is shut (FIN), and input is read and dropped until the peer closes too, so closing
        never resets the connection under bytes the peer has not read yet. All within LINGER
        seconds. Without `drain`, queued bytes are dropped. Pipe chunks not sent are released
        either way."""
        if self._fd < 0:
            return
        if drain:
            if self._closing is None:
                self._closing = self._loop.call_later(LINGER, self.close)
                self._loop.add_reader(self._fd, self._discard_input)
                if not self._queue:
                    self._shut_output()
            return
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None
            self._loop.remove_reader(self._fd)
        if self._watching:
            self._loop.remove_writer(self._fd)
            self._watching = False
        with contextlib.suppress(OSError):
            self._sock.close()
        self._fd = -1
        queue, self._queue = self._queue, deque()
        for piece in queue:
            if type(piece) is PipeChunk:
                piece.pipe.discard()
        self.buffered = 0
        self._closed.set()

    def _shut_output(self) -> None:
        """Everything is out: send FIN, and wait for the peer's (see _discard_input)."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()

    def _discard_input(self) -> None:
        try:
            data = self._sock.recv(256 * 1024)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()  # the peer closed as well: nothing is left unread

    async def wait_closed(self, timeout: float) -> None:
        """Wait until closed (a draining close sent everything); then close anyway."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), timeout)
        self.close()

    def _drain(self) -> None:
        queue = self._queue
        fd = self._fd
        try:
            while queue:
                first = queue[0]
                if type(first) is PipeChunk:
                    left = first.size - self._offset
                    assert _SPLICE is not None
                    n = _SPLICE(first.pipe.read_fd, fd, left, flags=_MOVE | _NONBLOCK)
                    if n <= 0:
                        raise BlockingIOError(errno.EAGAIN, "pipe empty")
                    self.buffered -= n
                    first.pipe.drained(n)
                    if n < left:
                        self._offset += n
                        continue  # the socket may take more: try until it says EAGAIN
                    queue.popleft()
                    self._offset = 0
                    continue
                # The run of byte pieces up to the next chunk, in one sendmsg. Before a chunk
                # (its frame headers) MSG_MORE holds them back to leave with the chunk's
                # bytes: one segment, one wakeup of the peer, instead of a tiny one first.
                iov: list[bytes | memoryview] = []
                flags = 0
                for piece in queue:
                    if type(piece) is PipeChunk:
                        flags = _MSG_MORE
                        break
                    if len(iov) == _IOV_MAX:
                        break
                    iov.append(piece)  # type: ignore[arg-type]
                if self._offset:
                    iov[0] = memoryview(iov[0])[self._offset :]
                n = self._sock.sendmsg(iov, (), flags)
                self.buffered -= n
                while n:
                    piece = queue[0]
                    left = len(piece) - self._offset
                    if n < left:
                        self._offset += n
                        break
                    n -= left
                    queue.popleft()
                    self._offset = 0
                else:
                    continue
                break  # a short write: the socket is full
        except BlockingIOError:
            pass
        except OSError as exc:
            self.close()
            self._on_error(exc)
            return
        if queue and not self._watching:
            self._loop.add_writer(fd, self._drain)
            self._watching = True
        elif not queue and self._watching:
            self._loop.remove_writer(fd)
            self._watching = False
        if not queue and self._closing is not None:
            self._shut_output()  # a draining close: everything is out
        if self._paused and not queue:
            self._paused = False
            self._on_resume()
