"""Apps served through `pico.sdk` in tests: a Starlette app (JSON, streaming both ways, SSE,
WebSocket echo, held and disconnect-watching requests, a lifespan that records its order), a
Flask app, and the same apps as processes:

    python -m tests.support.sdk_apps starlette ENDPOINT UPSTREAM_URL ADMIN_URL[,ADMIN_URL...]
    python -m tests.support.sdk_apps flask ENDPOINT UPSTREAM_URL

The Starlette process prints one JSON line per event ("startup", "serving", "shutdown",
"closed"), so a test reads the order from its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import pico.sdk

CHUNK = 256 * 1024
_BLOCK = bytes(range(256)) * (CHUNK // 256)


@dataclass
class Record:
    """What the Starlette app saw, for the test to read (in-process, or via /events)."""

    events: list[str] = field(default_factory=list)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    sse_next: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0  # bytes of /infinite the app's send() has returned from
    received: int = 0  # bytes of /upload taken so far
    on_event: Callable[[str], None] | None = None

    def add(self, event: str) -> None:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)


def starlette_app(record: Record, on_startup: Callable[[], Any] | None = None) -> Starlette:
    """The Starlette test app; `on_startup()` is called in its lifespan startup."""

    async def hello(request: Request) -> JSONResponse:
        client = request.client
        return JSONResponse(
            {
                "hello": "world",
                "client": client.host if client else None,
                "scheme": request.url.scheme,
                "n": request.query_params.get("n"),
            }
        )

    async def download(request: Request) -> StreamingResponse:
        size = int(request.query_params["size"])

        async def body() -> AsyncIterator[bytes]:
            left = size
            while left > 0:
                n = min(left, CHUNK)
                yield _BLOCK if n == CHUNK else _BLOCK[:n]
                left -= n

        return StreamingResponse(body(), headers={"content-length": str(size)})

    async def upload(request: Request) -> JSONResponse:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            record.received = total
        return JSONResponse({"received": total})

    async def slow_upload(request: Request) -> JSONResponse:
        await record.released.wait()  # takes nothing until released: the client must stall
        return await upload(request)

    async def infinite(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            while True:
                yield _BLOCK
                record.sent += CHUNK  # counted once send() returned: the chunk was taken
                # send() returns at once after a disconnect: let the loop see it.
                await asyncio.sleep(0)

        return StreamingResponse(body())

    async def sse(request: Request) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: event {i}\n\n".encode()
                if i < 2:
                    await record.sse_next.wait()  # the next one only once the client asks
                    record.sse_next.clear()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def sse_next(request: Request) -> PlainTextResponse:
        record.sse_next.set()
        return PlainTextResponse("ok")

    async def held(request: Request) -> PlainTextResponse:
        record.add("held")
        await record.released.wait()
        return PlainTextResponse("released")

    async def release(request: Request) -> PlainTextResponse:
        record.released.set()
        return PlainTextResponse("ok")

    async def events(request: Request) -> JSONResponse:
        return JSONResponse(record.events)

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is not None:
                    await websocket.send_text(message["text"])
                elif message.get("bytes") is not None:
                    await websocket.send_bytes(message["bytes"])

    class WatchDisconnect:
        """A raw ASGI endpoint that never answers; records the http.disconnect the
        client's abort brings."""

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            record.add("waiting")
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    record.add("http.disconnect")
                    return

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        record.add("startup")
        if on_startup is not None:
            result = on_startup()
            if asyncio.iscoroutine(result):
                await result
        yield
        record.add("shutdown")

    routes = [
        Route("/", hello),
        Route("/download", download),
        Route("/upload", upload, methods=["POST"]),
        Route("/slow-upload", slow_upload, methods=["POST"]),
        Route("/infinite", infinite),
        Route("/sse", sse),
        Route("/sse/next", sse_next),
        Route("/held", held),
        Route("/release", release),
        Route("/events", events),
        Route("/disconnect", WatchDisconnect()),
        WebSocketRoute("/ws", echo),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def flask_app() -> Flask:
    """A Flask app: JSON, a streamed body, and what it saw of the client."""
    app = Flask("sdk-test")

    @app.get("/")
    def hello() -> Any:
        return {"hello": "flask", "client": request.remote_addr}

    @app.post("/echo")
    def echo() -> Any:
        return Response(request.get_data(), mimetype="application/octet-stream")

    @app.get("/stream")
    def stream() -> Any:
        return Response((f"line {i}\n" for i in range(5)), mimetype="text/plain")

    return app


def _print(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def _registered(admin_urls: str, endpoint: str) -> bool:
    """Whether any of the nodes (comma-separated admin URLs) lists `endpoint`."""
    for url in admin_urls.split(","):
        with urllib.request.urlopen(f"{url}/status/proxy/endpoints", timeout=5) as resp:
            if endpoint in json.loads(resp.read()):
                return True
    return False


async def _serve_starlette(endpoint: str, url: str, admin_url: str) -> None:
    record = Record(on_event=_print)
    loop = asyncio.get_running_loop()

    async def check() -> None:
        registered = await loop.run_in_executor(None, _registered, admin_url, endpoint)
        _print("registered-at-startup", registered=registered)

    app = starlette_app(record, on_startup=check)
    stop = asyncio.Event()
    import signal

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with pico.sdk.serve_asgi(app, endpoint, url=url, grace=10) as served:
        _print("serving")
        waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(served.wait_closed())}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        await served.close()
    _print("closed")


def main(argv: list[str]) -> None:
    kind, endpoint, url = argv[:3]
    if kind == "starlette":
        import uvloop

        uvloop.run(_serve_starlette(endpoint, url, argv[3]))
    elif kind == "flask":
        pico.sdk.run(flask_app(), endpoint, url=url, interface="wsgi", grace=5)
    else:
        raise SystemExit(f"unknown app {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
