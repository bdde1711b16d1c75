"""An ASGI app on mux streams, run by uvicorn's own protocol classes.

Each stream the node opens is one HTTP connection, handed to uvicorn's HTTP protocol
(httptools or h11; a WebSocket upgrade switches to uvicorn's WebSocket protocol) on a
`StreamTransport`: uvicorn parses, keeps alive, upgrades and applies backpressure exactly as
it does on a socket. Lifespan is uvicorn's `LifespanOn`; the node's `X-Forwarded-For` and
`X-Forwarded-Proto` become `scope["client"]` and `scope["scheme"]` through uvicorn's
`ProxyHeadersMiddleware`, which trusts only the node (every stream comes from one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal, cast

from uvicorn import Config
from uvicorn.lifespan.on import LifespanOn
from uvicorn.server import ServerState

from pico import log
from pico.agent.inprocess import NODE_PEER
from pico.sdk.errors import StartupFailed
from pico.sdk.heads import DEFAULT_MAX_HEADER_BYTES, BoundedHttpToolsProtocol

_log = log.get_logger("sdk")

# Lifespan modes, HTTP and WebSocket implementations the SDK is tested with (uvicorn names).
HTTP_IMPLEMENTATIONS = ("httptools", "h11")
WS_IMPLEMENTATIONS = ("websockets-sansio", "none")
LIFESPAN_MODES = ("auto", "on", "off")


def _uncounted(limit: str) -> None:
    return None


class AsgiService:
    """One ASGI app served by uvicorn's protocols on streams (see the module docstring)."""

    def __init__(
        self,
        app: Any,
        *,
        http: str = "httptools",
        ws: str = "websockets-sansio",
        lifespan: str = "auto",
        timeout_keep_alive: float = 5.0,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        for name, value, allowed in (
            ("http", http, HTTP_IMPLEMENTATIONS),
            ("ws", ws, WS_IMPLEMENTATIONS),
            ("lifespan", lifespan, LIFESPAN_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: use one of {', '.join(allowed)}")
        if not callable(app):
            raise TypeError(f"app must be an ASGI application (a callable), not {app!r}")
        if max_header_bytes < 1:
            raise ValueError(f"max_header_bytes={max_header_bytes!r}: must be at least 1")
        self.http = http
        self.max_header_bytes = max_header_bytes
        self.config = Config(
            app,
            http=http,
            ws=ws,
            lifespan=cast(Literal["auto", "on", "off"], lifespan),
            interface="asgi3",
            proxy_headers=True,
            forwarded_allow_ips=[NODE_PEER[0]],
            log_config=None,  # the application's logging is its own business
            access_log=False,
            timeout_keep_alive=int(timeout_keep_alive),
            # h11 bounds a head itself (16 KiB by default: less than a node forwards).
            h11_max_incomplete_event_size=max_header_bytes,
        )
        self.config.load()
        self.state = ServerState()
        self._lifespan: LifespanOn | None = LifespanOn(self.config) if lifespan != "off" else None
        self._app_state = self._lifespan.state if self._lifespan is not None else {}
        self._protocol_class: Any = self.config.http_protocol_class
        self._on_limit: Callable[[str], None] = _uncounted
        self._lifespan_ran = False  # the app's lifespan startup completed

    def protocol_factory(self) -> asyncio.BaseProtocol:
        """uvicorn's HTTP protocol for a new stream, as uvicorn's server makes it (httptools'
        with a bound on the request head)."""
        if self.http == "httptools":
            return BoundedHttpToolsProtocol(
                self.config,
                self.state,
                self._app_state,
                max_header_bytes=self.max_header_bytes,
                on_limit=self._limit_hit,
            )
        protocol: asyncio.BaseProtocol = self._protocol_class(
            config=self.config, server_state=self.state, app_state=self._app_state
        )
        return protocol

    def report_limits(self, on_limit: Callable[[str], None]) -> None:
        """Call `on_limit(name)` for each request refused for the limit `name`."""
        self._on_limit = on_limit

    def _limit_hit(self, limit: str) -> None:
        self._on_limit(limit)

    async def startup(self) -> None:
        """Run the app's lifespan startup. Raises StartupFailed."""
        if self._lifespan is None:
            return
        await self._lifespan.startup()
        if self._lifespan.should_exit:
            raise StartupFailed("the ASGI app's lifespan startup failed (see its log)")
        # With lifespan="auto" uvicorn takes any exception for "lifespan unsupported", even
        # one raised at the shutdown of an app whose startup went well: remember which.
        self._lifespan_ran = not self._lifespan.error_occurred

    def shutdown_connections(self) -> None:
        """Graceful shutdown of every connection: idle ones close, busy ones after their
        response (uvicorn's own shutdown)."""
        for connection in list(self.state.connections):
            connection.shutdown()

    async def finish(self) -> None:
        """After the drain: cancel what is still running, then the lifespan shutdown."""
        tasks = list(self.state.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._lifespan is not None:
            await self._lifespan.shutdown()
            raised = self._lifespan_ran and self._lifespan.error_occurred
            if self._lifespan.should_exit or raised:
                _log.warn("the ASGI app's lifespan shutdown failed")
