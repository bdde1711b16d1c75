"""A sample service for tests: echo, streaming, SSE, WebSocket echo, slow and odd responses."""

from __future__ import annotations

import asyncio

from aiohttp import WSMsgType, web


def sample_app() -> web.Application:
    app = web.Application(client_max_size=1 << 34)
    r = app.router

    async def hello(request: web.Request) -> web.StreamResponse:
        return web.Response(text="hello")

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"x-method": request.method, "x-path": request.path_qs}
        for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "host"):
            if name in request.headers:
                headers["x-seen-" + name] = request.headers[name]
        return web.Response(body=body, headers=headers)

    async def headers(request: web.Request) -> web.StreamResponse:
        return web.json_response({k.lower(): v for k, v in request.headers.items()})

    async def count(request: web.Request) -> web.StreamResponse:
        """Reads the request body as a stream and returns its size (for huge uploads)."""
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        return web.Response(text=str(total))

    async def download(request: web.Request) -> web.StreamResponse:
        """Streams `size` bytes of b'x' with Content-Length."""
        size = int(request.query["size"])
        resp = web.StreamResponse(headers={"Content-Length": str(size)})
        await resp.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        while sent < size:
            n = min(len(chunk), size - sent)
            await resp.write(chunk[:n])
            sent += n
        return resp

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(f"part{i};".encode())
        await resp.write_eof()
        return resp

    async def sse(request: web.Request) -> web.StreamResponse:
        """One event, then waits for `?wait` seconds before the second (tests flushing)."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await asyncio.sleep(float(request.query.get("wait", "0.5")))
        await resp.write(b"data: second\n\n")
        return resp

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(float(request.query.get("delay", "5")))
        return web.Response(text="slow")

    async def status(request: web.Request) -> web.StreamResponse:
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code)
        return web.Response(status=code, text=f"status {code}")

    async def ws(request: web.Request) -> web.StreamResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sock.send_bytes(msg.data)
        return sock

    r.add_get("/", hello)
    r.add_route("*", "/echo", echo)
    r.add_get("/headers", headers)
    r.add_post("/count", count)
    r.add_put("/count", count)
    r.add_get("/download", download)
    r.add_get("/chunked", chunked)
    r.add_get("/sse", sse)
    r.add_get("/slow", slow)
    r.add_route("*", "/status/{code}", status)
    r.add_get("/ws", ws)
    return app
