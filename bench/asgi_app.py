"""The minimal ASGI app of the SDK row of `make bench`, served two ways in the same run:

    python -m uvicorn bench.asgi_app:app ...          (behind `pico agent`)
    python -m bench.asgi_app ENDPOINT UPSTREAM_URL    (through pico.sdk.serve_asgi, no port)

It answers /1k.bin and /1m.bin with that many bytes, as the nginx origin does.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pico.sdk

_BODIES = {"/1k.bin": os.urandom(1024), "/1m.bin": os.urandom(1024 * 1024)}
_HEADERS = {
    path: [(b"content-type", b"application/octet-stream"), (b"content-length", b"%d" % len(b))]
    for path, b in _BODIES.items()
}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return  # lifespan: nothing to start
    body = _BODIES.get(scope["path"])
    if body is None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS[scope["path"]]})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    endpoint, url = sys.argv[1:3]
    api_key = sys.argv[3] if len(sys.argv) > 3 else ""
    pico.sdk.run(app, endpoint, url=url, api_key=api_key)
