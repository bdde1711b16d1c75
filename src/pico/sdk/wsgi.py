"""A WSGI app (Flask, Django, ...) on mux streams: a2wsgi's `WSGIMiddleware` makes it an ASGI
app whose requests run on a pool of threads, served by `AsgiService` (uvicorn's protocols).

a2wsgi, not uvicorn's own WSGI middleware: uvicorn deprecates that one in its favour.
"""

from __future__ import annotations

from typing import Any

from a2wsgi import WSGIMiddleware
from a2wsgi.asgi_typing import Receive, Scope, Send

from pico import log
from pico.sdk.asgi import AsgiService

_log = log.get_logger("sdk")

# Requests that wait for a thread (all `threads` are running requests). Each holds its stream,
# uvicorn's request and up to 64 KiB of its body, and a request whose client left still waits
# (a thread cannot be interrupted): without a bound, an app whose threads all hang (a
# deadlock, a dead database) keeps one more for every request clients retry. Past it the
# request is answered 503 at once.
DEFAULT_MAX_WAITING = 100
# What `pico_agent_limit_rejections_total` names a request refused for max_waiting.
LIMIT_WAITING = "wsgi_waiting"
_BUSY = b'{"error":"wsgi app busy: too many requests waiting for a thread"}'
_BUSY_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_BUSY)).encode()),
]


class WsgiService(AsgiService):
    """A WSGI app run on `threads` threads (each request holds one while the app runs); at most
    `max_waiting` more requests wait for one, the next are answered 503."""

    def __init__(
        self,
        app: Any,
        *,
        threads: int = 10,
        max_waiting: int = DEFAULT_MAX_WAITING,
        http: str = "httptools",
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be a WSGI application (a callable), not {app!r}")
        if threads < 1:
            raise ValueError(f"threads={threads!r}: must be at least 1")
        if max_waiting < 0:
            raise ValueError(f"max_waiting={max_waiting!r}: must be at least 0")
        self.threads = threads
        self.max_waiting = max_waiting
        self._wsgi = WSGIMiddleware(app, workers=threads)
        self._in_flight = 0  # requests running on a thread or waiting for one
        # WSGI has no lifespan and no WebSocket.
        super().__init__(self._admit, http=http, ws="none", lifespan="off")

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request on the pool, or answer 503 if max_waiting already wait."""
        if scope["type"] != "http":
            await self._wsgi(scope, receive, send)
            return
        if self._in_flight >= self.threads + self.max_waiting:
            self._on_limit(LIMIT_WAITING)
            _log.warn_throttled(
                "request refused: max_waiting requests wait for a WSGI thread",
                threads=self.threads,
                max_waiting=self.max_waiting,
            )
            await send({"type": "http.response.start", "status": 503, "headers": _BUSY_HEADERS})
            await send({"type": "http.response.body", "body": _BUSY})
            return
        self._in_flight += 1
        try:
            await self._wsgi(scope, receive, send)
        finally:
            self._in_flight -= 1

    async def finish(self) -> None:
        await super().finish()
        # Requests still running in threads cannot be interrupted: the pool stops taking
        # work, and its threads end when their request does.
        self._wsgi.executor.shutdown(wait=False, cancel_futures=True)
