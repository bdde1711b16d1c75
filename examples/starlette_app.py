"""A Starlette app on a Pico endpoint, served from this process (no local port, no agent).

    pip install 'pico[sdk]' starlette
    pico server &                                   # a node: proxy 8000, upstream 8001
    python examples/starlette_app.py                # registers endpoint "my-app"
    curl http://localhost:8000/ -H "x-pico-endpoint: my-app"

PICO_URL (default http://localhost:8001) is the node's upstream port, PICO_API_KEY its token.
Ctrl-C drains: in-flight requests finish, then the lifespan shutdown runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import pico.sdk


async def hello(request: Request) -> JSONResponse:
    client = request.client  # the real client: from the node's X-Forwarded-For
    return JSONResponse({"hello": "world", "client": client.host if client else None})


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            await websocket.send_text(await websocket.receive_text())


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    print("startup: runs before the endpoint is registered")
    yield
    print("shutdown: runs after the drain")


app = Starlette(routes=[Route("/", hello), WebSocketRoute("/ws", echo)], lifespan=lifespan)

if __name__ == "__main__":
    pico.sdk.run(
        app,
        "my-app",
        url=os.environ.get("PICO_URL", "http://localhost:8001"),
        api_key=os.environ.get("PICO_API_KEY", ""),
    )
