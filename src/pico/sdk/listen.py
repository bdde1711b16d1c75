"""Raw streams on a TCP endpoint, like a server socket: `Listener` hands out one
(StreamReader, StreamWriter) pair per connection a client opens through the node."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from pico.sdk.serve import Served

# Connections the node opened that the application has not taken yet; more are refused (the
# node tells the client) rather than held: this bounds what an application that stopped
# accepting makes us keep.
DEFAULT_BACKLOG = 128
# A StreamReader's buffer limit: past twice this the stream stops crediting the node.
DEFAULT_READ_LIMIT = 64 * 1024

Pair = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Accepted(asyncio.StreamReaderProtocol):
    """A connection's protocol: once connected, its streams join the backlog."""

    def __init__(self, listener: StreamService) -> None:
        self.reader = asyncio.StreamReader(limit=listener.read_limit)
        super().__init__(self.reader)
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        writer = asyncio.StreamWriter(
            cast(asyncio.WriteTransport, transport), self, self.reader, loop
        )
        self.listener.offer((self.reader, writer))


class StreamService:
    """The in-process service of `listen()`: a backlog of accepted connections."""

    def __init__(self, *, backlog: int = DEFAULT_BACKLOG, read_limit: int = DEFAULT_READ_LIMIT):
        if backlog < 1:
            raise ValueError(f"backlog={backlog!r}: must be at least 1")
        if read_limit < 1:
            raise ValueError(f"read_limit={read_limit!r}: must be at least 1")
        self.read_limit = read_limit
        self._backlog: asyncio.Queue[Pair | None] = asyncio.Queue(backlog)
        self._closed = False

    def protocol_factory(self) -> asyncio.BaseProtocol:
        """A protocol for a new stream; ConnectionRefusedError when the backlog is full."""
        if self._closed or self._backlog.full():
            raise ConnectionRefusedError("listener backlog full")
        return _Accepted(self)

    def offer(self, pair: Pair) -> None:
        """A connection is up: the application may take it."""
        self._backlog.put_nowait(pair)

    async def accept(self) -> Pair:
        """The next connection. Raises ConnectionAbortedError once the listener is closed."""
        if self._closed and self._backlog.empty():
            raise ConnectionAbortedError("listener closed")
        pair = await self._backlog.get()
        if pair is None:
            self._backlog.put_nowait(None)  # wake the next waiter too
            raise ConnectionAbortedError("listener closed")
        return pair

    def report_limits(self, on_limit: Callable[[str], None]) -> None:
        """A full backlog is a refused dial: the agent counts it (dial_errors, refused)."""

    async def startup(self) -> None:
        return None

    def shutdown_connections(self) -> None:
        """No new connections; the ones not accepted yet are closed."""
        self._closed = True
        while not self._backlog.empty():
            pair = self._backlog.get_nowait()
            if pair is not None:
                pair[1].close()
        self._backlog.put_nowait(None)

    async def finish(self) -> None:
        return None  # accepted connections are the application's; the tunnel has closed


class Listener(Served):
    """A TCP endpoint served from this process: `async with` registers it (see `Served`);
    `accept()` or `async for reader, writer in listener` take the connections clients open.

    Each pair is yours to close. `close(grace)` refuses new connections, closes those not
    taken yet, and gives the open ones `grace` seconds before the tunnel closes under them.
    """

    def __init__(self, service: StreamService, endpoint: str, **options: Any) -> None:
        super().__init__(service, endpoint, protocol="tcp", **options)
        self._streams = service

    async def __aenter__(self) -> Listener:
        await self.start()
        return self

    async def accept(self) -> Pair:
        """The next connection. Raises ConnectionAbortedError once the listener is closed.
        Safe to cancel."""
        return await self._streams.accept()

    def __aiter__(self) -> AsyncIterator[Pair]:
        return self._pairs()

    async def _pairs(self) -> AsyncIterator[Pair]:
        while True:
            try:
                yield await self._streams.accept()
            except ConnectionAbortedError:
                return
