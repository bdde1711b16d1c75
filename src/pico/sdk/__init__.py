"""Put an app on a Pico endpoint from inside the process: no local port, no agent process.

```python
import pico.sdk

pico.sdk.run(app, "my-app", url="https://pico.example.com:8001", api_key=TOKEN)  # blocks

async with pico.sdk.serve_asgi(app, "my-app", url=...) as served:   # in a running loop
    await served.wait_closed()

async with pico.sdk.serve_wsgi(flask_app, "legacy", url=...) as served: ...
async with pico.sdk.listen("raw", url=...) as listener:               # a TCP endpoint
    async for reader, writer in listener: ...
reader, writer = await pico.sdk.connect("my-db", url="http://pico.example.com:8000")
```

`url` is the upstream port (8001) for serving and the proxy port (8000) for `connect()`.
Every function returns the same type wherever it is called: `serve_*` and `listen` an async
context manager (`Served`, `Listener`), `connect` a coroutine, `run` blocks (and raises
RuntimeError inside a running event loop). The tunnel is the agent's own
(`pico.agent.agent`): reconnects with backoff, follows a node's GoAway, drains on close.
Requires the `sdk` extra (`pip install 'pico[sdk]'`: uvicorn, a2wsgi).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

try:
    from pico.sdk.asgi import AsgiService
    from pico.sdk.heads import DEFAULT_MAX_HEADER_BYTES
    from pico.sdk.wsgi import DEFAULT_MAX_WAITING, WsgiService
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        f"pico.sdk needs the 'sdk' extra ({exc.name} is missing): pip install 'pico[sdk]'"
    ) from exc
from pico.sdk.connect import connect
from pico.sdk.errors import (
    ConnectError,
    EndpointRejected,
    NotPermitted,
    PicoError,
    StartupFailed,
    UnknownEndpoint,
    Unreachable,
    WrongProtocol,
)
from pico.sdk.listen import DEFAULT_BACKLOG, Listener, StreamService
from pico.sdk.serve import DEFAULT_GRACE, Served

__all__ = [
    "ConnectError",
    "EndpointRejected",
    "Listener",
    "NotPermitted",
    "PicoError",
    "Served",
    "StartupFailed",
    "UnknownEndpoint",
    "Unreachable",
    "WrongProtocol",
    "connect",
    "listen",
    "run",
    "serve_asgi",
    "serve_wsgi",
]


def serve_asgi(
    app: Any,
    endpoint: str,
    *,
    url: str,
    api_key: str = "",
    root_ca: str = "",
    grace: float = DEFAULT_GRACE,
    http: str = "httptools",
    ws: str = "websockets-sansio",
    lifespan: str = "auto",
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> Served:
    """Serve the ASGI app `app` (Starlette, FastAPI, Django, Quart, ...) on `endpoint`.

    `url` is a node's upstream port (http:// or https://, `root_ca` to verify it), `api_key`
    the token the node wants. Use the result with `async with`: it runs the app's lifespan
    startup, registers the endpoint, and on leaving drains (GoAway; in-flight requests get
    `grace` seconds) and runs the lifespan shutdown. `http` ("httptools" or "h11"), `ws`
    ("websockets-sansio" or "none": WebSocket upgrades refused) and `lifespan` ("auto", "on",
    "off") pick uvicorn's implementations (the ones tested with it). A request head over
    `max_header_bytes` is answered 431 (h11: 400), counted in
    `pico_agent_limit_rejections_total{limit="max_header_bytes"}` (httptools); keep it above
    the node's proxy.max_header_bytes. Raises ValueError (bad arguments) at once;
    StartupFailed and EndpointRejected from `async with`.
    """
    service = AsgiService(
        app, http=http, ws=ws, lifespan=lifespan, max_header_bytes=max_header_bytes
    )
    return Served(service, endpoint, url=url, api_key=api_key, root_ca=root_ca, grace=grace)


def serve_wsgi(
    app: Any,
    endpoint: str,
    *,
    url: str,
    api_key: str = "",
    root_ca: str = "",
    grace: float = DEFAULT_GRACE,
    threads: int = 10,
    max_waiting: int = DEFAULT_MAX_WAITING,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> Served:
    """Serve the WSGI app `app` (Flask, Django, ...) on `endpoint`, its requests on a pool of
    `threads` threads. Otherwise as `serve_asgi` (no lifespan, no WebSocket in WSGI).

    At most `max_waiting` requests wait for a thread (a thread cannot be interrupted, so one
    whose client left still waits its turn); more are answered 503 at once and counted in
    `pico_agent_limit_rejections_total{limit="wsgi_waiting"}`.
    """
    service = WsgiService(
        app, threads=threads, max_waiting=max_waiting, max_header_bytes=max_header_bytes
    )
    return Served(service, endpoint, url=url, api_key=api_key, root_ca=root_ca, grace=grace)


def listen(
    endpoint: str,
    *,
    url: str,
    api_key: str = "",
    root_ca: str = "",
    grace: float = DEFAULT_GRACE,
    backlog: int = DEFAULT_BACKLOG,
) -> Listener:
    """Register the TCP endpoint `endpoint` and take its connections as asyncio streams.

    Use with `async with`, then `async for reader, writer in listener` (or `accept()`).
    At most `backlog` connections wait to be taken; more are refused. Clients reach it with
    `connect()` or `pico forward tcp`.
    """
    service = StreamService(backlog=backlog)
    return Listener(service, endpoint, url=url, api_key=api_key, root_ca=root_ca, grace=grace)


def run(
    app: Any,
    endpoint: str,
    *,
    url: str,
    api_key: str = "",
    root_ca: str = "",
    grace: float = DEFAULT_GRACE,
    interface: Literal["asgi", "wsgi"] = "asgi",
) -> None:
    """Serve `app` on `endpoint` until SIGINT or SIGTERM (then drain as `close()` does).

    Blocks, on uvloop when installed. `interface="wsgi"` for a WSGI app. Raises RuntimeError
    when called inside a running event loop (use `serve_asgi` there), ValueError for bad
    arguments, EndpointRejected or StartupFailed.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "pico.sdk.run() blocks until the app stops, so it cannot be called inside a "
            "running event loop (an async function, a notebook): use "
            "`async with pico.sdk.serve_asgi(app, endpoint, url=...) as served: "
            "await served.wait_closed()` there"
        )
    if interface not in ("asgi", "wsgi"):
        raise ValueError(f"interface={interface!r}: use 'asgi' or 'wsgi'")
    # Imported here: the CLI's runner (signals, uvloop) is the agent's, reused.
    from pico.cli.runtime import run as run_until_signal

    async def main(stop: asyncio.Event) -> int:
        options: dict[str, Any] = {"url": url, "api_key": api_key, "root_ca": root_ca}
        serve = serve_wsgi if interface == "wsgi" else serve_asgi
        async with serve(app, endpoint, grace=grace, **options) as served:
            stopped = asyncio.ensure_future(stop.wait())
            closed = asyncio.ensure_future(served.wait_closed())
            try:
                await asyncio.wait({stopped, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                closed.cancel()
            if closed.done() and not closed.cancelled() and closed.exception() is not None:
                raise closed.exception()  # type: ignore[misc]
        return 0

    run_until_signal(main)
