"""A WSGI app (Flask, Django, ...) on mux streams: a2wsgi's `WSGIMiddleware` makes it an ASGI
app whose requests run on a pool of threads, served by `AsgiService` (uvicorn's protocols).

a2wsgi, not uvicorn's own WSGI middleware: uvicorn deprecates that one in its favour.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from typing import Any

from a2wsgi import WSGIMiddleware
from a2wsgi.asgi_typing import (
    HTTPDisconnectEvent,
    HTTPScope,
    Receive,
    ReceiveEvent,
    Scope,
    Send,
)
from a2wsgi.wsgi import WSGIResponder

from pico import log
from pico.sdk.asgi import AsgiService
from pico.sdk.heads import DEFAULT_MAX_HEADER_BYTES

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


_DISCONNECT: HTTPDisconnectEvent = {"type": "http.disconnect"}


class _ClientGone(ConnectionError):
    """The request's client left, or the request was cancelled: its thread stops sending."""


class _Responder(WSGIResponder):
    """a2wsgi's responder, whose thread stops once nobody will read what it sends.

    a2wsgi's thread hands each chunk of the response to the loop and waits until it is taken;
    uvicorn drops, without a word, what is sent to a client that left. So an endless response
    (a stream, server-sent events) would keep its thread for good after a disconnect, and
    the thread of a request cancelled by close() would wait forever for a queue nobody reads
    (and keep the process from exiting). Here a disconnect or the cancellation makes the
    thread's next send raise: the app's iterable is closed, as a WSGI server does when a
    write to the client fails.
    """

    def __init__(self, app: Any, executor: Any, send_queue_size: int) -> None:
        super().__init__(app, executor, send_queue_size)
        # Done once the client is gone: the thread waits on it beside each send.
        self._left: concurrent.futures.Future[None] = concurrent.futures.Future()
        # The request's messages for the app's body reads, one at a time: uvicorn's reading
        # stays paused while the app does not take them.
        self._messages: asyncio.Queue[ReceiveEvent] = asyncio.Queue(1)

    async def __call__(self, scope: HTTPScope, receive: Receive, send: Send) -> None:
        pump = asyncio.get_running_loop().create_task(self._pump(receive))
        try:
            await super().__call__(scope, self._receive, send)
        except _ClientGone:
            pass  # the app's iterable is closed; nothing is owed to a client that left
        finally:
            self._leave()  # cancelled (close), or done: a thread still running stops
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _pump(self, receive: Receive) -> None:
        """Pass the body on; once it is in, the next message can only be the disconnect."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            await self._messages.put(message)
            if not message.get("more_body", False):
                await receive()  # the disconnect (or the end of the response)
                break
        self._leave()

    async def _receive(self) -> ReceiveEvent:
        """The app's body reads: the next message, a disconnect once the client is gone."""
        if self._left.done() and self._messages.empty():
            return _DISCONNECT
        return await self._messages.get()

    def _leave(self) -> None:
        if not self._left.done():
            self._left.set_result(None)
            with contextlib.suppress(asyncio.QueueFull):
                self._messages.put_nowait(_DISCONNECT)  # for a body read waiting now

    def send(self, message: Any) -> None:
        """From the app's thread: hand `message` to the loop; raises _ClientGone once the
        client is gone (then the message is dropped)."""
        if self._left.done():
            raise _ClientGone("the client is gone")
        future = asyncio.run_coroutine_threadsafe(self.send_queue.put(message), loop=self.loop)
        concurrent.futures.wait(
            (future, self._left), return_when=concurrent.futures.FIRST_COMPLETED
        )
        if not future.done():
            future.cancel()
            raise _ClientGone("the client is gone")
        future.result()


class _Middleware(WSGIMiddleware):
    """a2wsgi's middleware with `_Responder` for HTTP requests."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            responder = _Responder(self.app, self.executor, self.send_queue_size)
            await responder(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


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
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be a WSGI application (a callable), not {app!r}")
        if threads < 1:
            raise ValueError(f"threads={threads!r}: must be at least 1")
        if max_waiting < 0:
            raise ValueError(f"max_waiting={max_waiting!r}: must be at least 0")
        self.threads = threads
        self.max_waiting = max_waiting
        self._wsgi = _Middleware(app, workers=threads)
        self._in_flight = 0  # requests running on a thread or waiting for one
        # WSGI has no lifespan and no WebSocket.
        super().__init__(
            self._admit, http=http, ws="none", lifespan="off", max_header_bytes=max_header_bytes
        )

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
