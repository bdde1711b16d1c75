"""Serving an aiohttp app on a configured `host:port` (the admin ports of nodes and agents),
behind a `ConnectionGuard`: head and idle timeouts, a cap on open connections, and bad input
logged once per reason per minute without a traceback.

aiohttp bounds neither how long a client may take to send a head nor how many connections it
may hold: ~1000 slowloris connections on the admin port used up the process's file
descriptors and left the proxy port unable to accept. Each connection's aiohttp protocol is
wrapped by a `_Guarded` protocol that owns its timers; a middleware tells it when a head was
complete (a request reached the app) and when the response is done.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from pico import log
from pico.config import parse_host_port

_log = log.get_logger("admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What a connection refused for the cap is told, before it is closed.
_BUSY_BODY = b'{"error": "too many connections"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class BindError(Exception):
    """The address could not be bound; the message names the config key."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Limits of one HTTP port served by aiohttp; each protects the process from slow or many
    clients. A timeout of 0 disables it."""

    # A client must send a complete request head within this (slowloris protection). Also
    # bounds the TLS handshake.
    read_header_timeout: float = 10.0
    # A kept-alive connection with no request in progress is closed after this.
    idle_timeout: float = 300.0
    # Open connections at most: each is a file descriptor the proxy port also needs. When
    # full, the connection idle or waiting for its head the longest is closed to make room
    # (a slowloris crowd cannot lock probes out); if every one is busy, the new one gets 503.
    max_connections: int = 256


class _State(enum.Enum):
    HEAD = "head"  # a request head is owed (a new connection, or bytes after a response)
    BUSY = "busy"  # a request is being handled
    IDLE = "idle"  # kept alive between requests


class ConnectionGuard:
    """The open connections of one port, the limits they are held to, and what was refused.

    `rejected` counts connections closed or refused by reason (`read_header_timeout`,
    `idle_timeout`, `max_connections`, `bad_request`), for metrics.
    """

    def __init__(self, limits: ConnectionLimits | None = None, port: str = "admin") -> None:
        self.limits = limits or ConnectionLimits()
        self.port = port
        self.rejected: dict[str, int] = {}
        # Oldest first (dicts keep insertion order): who makes room when the port is full.
        self._open: dict[asyncio.BaseTransport, _Guarded] = {}
        self._bad_input = log.RateLimited(_log)
        self.server_logger = _QuietLogger(self)

    @property
    def open_connections(self) -> int:
        """Connections open now."""
        return len(self._open)

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], _Guarded]:
        """A protocol factory for `loop.create_server` wrapping the one of aiohttp."""
        return lambda: _Guarded(self, inner())

    def reject(self, reason: str, peer: str, detail: str = "") -> None:
        """Count a refused or closed connection; log it (rate limited) at warn."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        fields: dict[str, object] = {"port": self.port, "client": peer}
        if detail:
            fields["error"] = detail
        self._bad_input.warn(reason, "connection refused or closed", **fields)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks the connection busy while the app handles a request (no head timeout)."""
        conn = self._open.get(request.transport) if request.transport is not None else None
        if conn is not None:
            conn.to(_State.BUSY)
        try:
            return await handler(request)
        finally:
            if conn is not None:
                conn.to(_State.IDLE)

    def admit(self, conn: _Guarded, transport: asyncio.BaseTransport) -> bool:
        """Register a new connection, making room if the port is full; False if it is not
        admitted (every open connection is busy)."""
        if len(self._open) >= self.limits.max_connections > 0:
            victim = next((c for c in self._open.values() if c.state is not _State.BUSY), None)
            if victim is None:
                return False
            self.reject("max_connections", victim.peer, "closed to make room")
            victim.close()
        self._open[transport] = conn
        return True

    def forget(self, transport: asyncio.BaseTransport | None) -> None:
        if transport is not None:
            self._open.pop(transport, None)


class _Guarded(asyncio.Protocol):
    """One connection: the aiohttp protocol inside, with the guard's timers around it."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner: asyncio.Protocol | None = inner
        self.transport: asyncio.Transport | None = None
        self.state = _State.HEAD
        self.peer = ""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        if not self.guard.admit(self, transport):
            self.inner = None
            self.guard.reject("max_connections", self.peer, "every connection is busy")
            self.transport.write(_BUSY)
            self.transport.close()
            return
        assert self.inner is not None
        self.inner.connection_made(transport)
        self._arm()

    def to(self, state: _State) -> None:
        """Move to `state` (the middleware says when a request starts and ends)."""
        self.state = state
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        limits = self.guard.limits
        match self.state:
            case _State.HEAD:
                delay = limits.read_header_timeout
            case _State.IDLE:
                delay = limits.idle_timeout
            case _State.BUSY:
                delay = 0.0  # the app's own business (a forwarded admin request has its own)
        if delay > 0 and self.transport is not None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._expired)

    def _expired(self) -> None:
        self._timer = None
        reason = "read_header_timeout" if self.state is _State.HEAD else "idle_timeout"
        if self.state is _State.HEAD:
            self.guard.reject(reason, self.peer, "request head not received in time")
        else:
            self.guard.rejected[reason] = self.guard.rejected.get(reason, 0) + 1
        self.close()

    def close(self) -> None:
        """Close the connection; it no longer counts against the cap."""
        self.guard.forget(self.transport)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.state is _State.IDLE:
            self.to(_State.HEAD)  # the next request is arriving: its head is owed now
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.guard.forget(self.transport)
        self.transport = None
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.connection_lost(exc)


class _QuietLogger(logging.Logger):
    """aiohttp's server logger: malformed input from a peer (an HTTP/2 preface, TLS on a
    plain port, a bad header) is bad input, counted and logged once per reason per minute
    without a traceback; anything else (a bug in a handler) keeps its traceback."""

    def __init__(self, guard: ConnectionGuard) -> None:
        super().__init__("aiohttp.server")
        self.guard = guard
        self.parent = logging.getLogger("aiohttp")

    def _peer_error(self, exc_info: object) -> HttpProcessingError | None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        return exc if isinstance(exc, HttpProcessingError) else None

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        bad = self._peer_error(exc_info)
        if bad is None:
            super().exception(msg, *args, exc_info=exc_info, **kw)
            return
        peer = str(args[0]) if args else ""
        self.guard.reject("bad_request", peer, _first_line(bad.message))

    def debug(self, msg: object, *args: object, **kw: Any) -> None:
        bad = self._peer_error(kw.get("exc_info"))
        if bad is not None:  # aiohttp's own verdict on TLS to a plain port: still counted
            self.guard.reject("bad_request", str(args[0]) if args else "", _first_line(bad.message))
            return
        super().debug(msg, *args, **kw)


def _first_line(message: str) -> str:
    return message.strip().split("\n", 1)[0].rstrip(":")[:200]


class _GuardedSite(web.BaseSite):
    """A TCP site whose connections pass through a `ConnectionGuard`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int,
        guard: ConnectionGuard,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=1024)
        self._host = host
        self._port = port
        self._guard = guard
        self.bound: tuple[str, int] = ("", 0)

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host or '0.0.0.0'}:{self.bound[1] or self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        head_timeout = self._guard.limits.read_header_timeout
        self._server = srv = await loop.create_server(
            self._guard.protocol_factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            # The handshake is part of the head a client owes us.
            ssl_handshake_timeout=(head_timeout or None) if self._ssl_context else None,
            backlog=self._backlog,
            reuse_address=True,
        )
        self.bound = cast(tuple[str, int], srv.sockets[0].getsockname()[:2])


async def serve_app(
    app: web.Application,
    bind: str,
    key: str,
    tls: ssl.SSLContext | None = None,
    guard: ConnectionGuard | None = None,
) -> tuple[web.AppRunner, tuple[str, int]]:
    """Start `app` on `bind` (TLS with `tls`) behind `guard` (default limits if None);
    returns the runner and the bound (host, port)."""
    host, port = parse_host_port(bind, key=key)
    guard = guard or ConnectionGuard()
    app.middlewares.insert(0, guard.middleware)
    limits = guard.limits
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        logger=guard.server_logger,
        # aiohttp's own idle timer, behind ours (0 would mean "never" there: keep it long).
        keepalive_timeout=limits.idle_timeout or 3630.0,
    )
    await runner.setup()
    site = _GuardedSite(runner, host or None, port, guard, tls)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise BindError(f"{key}: cannot listen on {bind!r}: {exc.strerror or exc}") from exc
    return runner, (host, site.bound[1])
