"""A WSGI app (Flask, Django, ...) on mux streams: a2wsgi's `WSGIMiddleware` makes it an ASGI
app whose requests run on a pool of threads, served by `AsgiService` (uvicorn's protocols).

a2wsgi, not uvicorn's own WSGI middleware: uvicorn deprecates that one in its favour.
"""

from __future__ import annotations

from typing import Any

from a2wsgi import WSGIMiddleware

from pico.sdk.asgi import AsgiService


class WsgiService(AsgiService):
    """A WSGI app run on `threads` threads (each request holds one while the app runs)."""

    def __init__(self, app: Any, *, threads: int = 10, http: str = "httptools") -> None:
        if not callable(app):
            raise TypeError(f"app must be a WSGI application (a callable), not {app!r}")
        if threads < 1:
            raise ValueError(f"threads={threads!r}: must be at least 1")
        self._wsgi = WSGIMiddleware(app, workers=threads)
        # WSGI has no lifespan and no WebSocket.
        super().__init__(self._wsgi, http=http, ws="none", lifespan="off")

    async def finish(self) -> None:
        await super().finish()
        # Requests still running in threads cannot be interrupted: the pool stops taking
        # work, and its threads end when their request does.
        self._wsgi.executor.shutdown(wait=False, cancel_futures=True)
