"""`pico dev lb`: a small TCP load balancer for local clusters (when nginx is not installed).

Each accepted connection is spliced byte for byte to the next backend in round-robin order; a
backend that refuses the connection is skipped, so a dead node is routed around at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import cast

# A backend that does not accept within this is skipped for this connection.
_CONNECT_TIMEOUT = 1.0
_HIGH_WATER = 256 * 1024


class _Half(asyncio.Protocol):
    """One side of a spliced pair: what it reads, the peer writes, with backpressure."""

    def __init__(self, owner: set[_Half] | None = None) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.pending: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=_HIGH_WATER)
        if self.owner is not None:
            self.owner.add(self)

    def attach(self, peer: _Half) -> None:
        self.peer = peer
        pending, self.pending = self.pending, []
        for data in pending:
            peer.write(data)
        if self.eof:
            peer.write_eof()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.pending.append(data)
        else:
            self.peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None:
            self.peer.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.owner is not None:
            self.owner.discard(self)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class TcpLoadBalancer:
    """Listens on one address and spreads connections over `backends` ((host, port) pairs)."""

    def __init__(self, listen: tuple[str, int], backends: Sequence[tuple[str, int]]) -> None:
        self.listen = listen
        self.backends = list(backends)
        self._next = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[_Half] = set()  # every open connection, both sides

    async def start(self) -> None:
        """Start listening."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, *self.listen, reuse_address=True)

    @property
    def port(self) -> int:
        """The port listened on (useful with port 0)."""
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    def _accept(self) -> _Half:
        return _Client(self)

    def _connect_later(self, client: _Half) -> None:
        task = asyncio.get_running_loop().create_task(self._connect(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, client: _Half) -> None:
        loop = asyncio.get_running_loop()
        n = len(self.backends)
        start, self._next = self._next, (self._next + 1) % max(n, 1)
        for i in range(n):
            host, port = self.backends[(start + i) % n]
            try:
                _, backend = await asyncio.wait_for(
                    loop.create_connection(lambda: _Half(self._conns), host, port),
                    _CONNECT_TIMEOUT,
                )
            except (OSError, TimeoutError):
                continue
            if client.transport is None:  # the client left while we connected
                if backend.transport is not None:
                    backend.transport.close()
                return
            backend.attach(client)
            client.attach(backend)
            return
        if client.transport is not None:
            client.transport.abort()

    async def close(self) -> None:
        """Stop listening, cancel pending connects and drop every open connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.abort()


class _Client(_Half):
    def __init__(self, lb: TcpLoadBalancer) -> None:
        super().__init__(lb._conns)
        self.lb = lb

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.lb._connect_later(self)


async def run_lb(routes: Sequence[tuple[tuple[str, int], Sequence[tuple[str, int]]]]) -> None:
    """Serve every (listen, backends) route until cancelled."""
    balancers = [TcpLoadBalancer(listen, backends) for listen, backends in routes]
    try:
        for lb in balancers:
            await lb.start()
        await asyncio.Event().wait()
    finally:
        for lb in balancers:
            with contextlib.suppress(Exception):
                await lb.close()
