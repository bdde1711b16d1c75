"""Sample services for tests (echo, streaming, SSE, WebSocket echo, slow and odd responses),
and a minimal raw HTTP/1.1 client for tests where the exact bytes on the wire matter."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

# The client ports a service has seen: one per TCP connection the agent opened to it.
PEERS = web.AppKey("peers", set[int])


def pattern(size: int) -> bytes:
    """`size` bytes of a repeating, position-dependent pattern (catches reordering and loss)."""
    block = bytes(range(251))  # 251 is prime: no alignment with any power-of-two chunk size
    return (block * (size // len(block) + 1))[:size]


def sample_app(name: str = "service") -> web.Application:
    """The sample service; `name` is returned by /whoami (to tell upstreams apart)."""
    app = web.Application(client_max_size=1 << 34)
    r = app.router
    peers: set[int] = set()
    app[PEERS] = peers

    @web.middleware
    async def track_peers(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            peers.add(int(peer[1]))
        return await handler(request)

    app.middlewares.append(track_peers)

    async def hello(request: web.Request) -> web.StreamResponse:
        return web.Response(text="hello")

    async def whoami(request: web.Request) -> web.StreamResponse:
        return web.Response(text=name)

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"x-method": request.method, "x-path": request.path_qs}
        for hname in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "host"):
            if hname in request.headers:
                headers["x-seen-" + hname] = request.headers[hname]
        return web.Response(body=body, headers=headers)

    async def headers(request: web.Request) -> web.StreamResponse:
        return web.json_response({k.lower(): v for k, v in request.headers.items()})

    async def count(request: web.Request) -> web.StreamResponse:
        """Reads the request body as a stream; returns its size and whether it matched
        `pattern()` (for huge uploads that must not be held in memory)."""
        total = 0
        ok = True
        block = pattern(251 * 1024)
        async for chunk in request.content.iter_any():
            if ok:
                ok = _matches(block, total, chunk)
            total += len(chunk)
        return web.Response(text=f"{total} {'ok' if ok else 'corrupt'}")

    async def download(request: web.Request) -> web.StreamResponse:
        """Streams `size` bytes of `pattern()` with Content-Length (or chunked: `?chunked=1`)."""
        size = int(request.query["size"])
        chunked = request.query.get("chunked") == "1"
        resp = web.StreamResponse(headers={} if chunked else {"Content-Length": str(size)})
        if chunked:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        block = pattern(251 * 256)  # 64256 bytes, a whole number of pattern periods
        sent = 0
        while sent < size:
            n = min(len(block), size - sent)
            await resp.write(block[:n])
            sent += n
        await resp.write_eof()
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

    async def broken(request: web.Request) -> web.StreamResponse:
        """Promises `size` bytes (or a chunked body: `?chunked=1`), sends `after` bytes, then
        drops the connection."""
        size = int(request.query.get("size", "1000000"))
        after = int(request.query.get("after", "1000"))
        resp = web.StreamResponse()
        if request.query.get("chunked") == "1":
            resp.enable_chunked_encoding()
        else:
            resp.content_length = size
        await resp.prepare(request)
        await resp.write(pattern(after))
        assert request.transport is not None
        request.transport.abort()
        return resp

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
    r.add_get("/whoami", whoami)
    r.add_route("*", "/echo", echo)
    r.add_get("/headers", headers)
    r.add_post("/count", count)
    r.add_put("/count", count)
    r.add_get("/download", download)
    r.add_get("/chunked", chunked)
    r.add_get("/sse", sse)
    r.add_get("/slow", slow)
    r.add_get("/broken", broken)
    r.add_route("*", "/status/{code}", status)
    r.add_get("/ws", ws)
    return app


def _matches(block: bytes, offset: int, chunk: bytes) -> bool:
    """Whether `chunk` equals `pattern()` at `offset` (block is a whole number of periods)."""
    start = offset % 251
    pos = 0
    while pos < len(chunk):
        n = min(len(block) - start, len(chunk) - pos)
        if chunk[pos : pos + n] != block[start : start + n]:
            return False
        pos += n
        start = 0
    return True


# -- a raw HTTP/1.1 client --------------------------------------------------------------------


@dataclass
class RawResponse:
    """One response as read off the wire."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    raw_head: bytes = b""
    chunked: bool = False
    interim: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        lname = name.lower()
        return next((v for n, v in self.headers if n.lower() == lname), None)


class RawConnection:
    """A client connection that writes exact bytes and reads responses one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int, *, limit: int = 1 << 20) -> RawConnection:
        reader, writer = await asyncio.open_connection(host, port, limit=limit)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_head(self, timeout: float = 10.0) -> RawResponse:
        """Read one response head (interim 1xx heads are returned too)."""
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = raw.decode("latin-1").split("\r\n")
        _, status, *reason = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.append((name.strip(), value.strip()))
        return RawResponse(int(status), reason[0] if reason else "", headers, raw_head=raw)

    async def read_response(
        self, *, head_request: bool = False, timeout: float = 10.0
    ) -> RawResponse:
        """Read one final response (skipping 1xx, recorded in `interim`) and its body."""
        interim: list[int] = []
        while True:
            resp = await self.read_head(timeout)
            if resp.status >= 200 or resp.status == 101:
                break
            interim.append(resp.status)
        resp.interim = interim
        if head_request or resp.status in (204, 304) or resp.status < 200:
            return resp
        te = resp.header("transfer-encoding")
        length = resp.header("content-length")
        if te is not None and "chunked" in te.lower():
            resp.chunked = True
            resp.body = await asyncio.wait_for(self._read_chunked(), timeout)
        elif length is not None:
            resp.body = await asyncio.wait_for(self.reader.readexactly(int(length)), timeout)
        else:
            resp.body = await asyncio.wait_for(self.reader.read(-1), timeout)
        return resp

    async def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while await self.reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    async def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """True if the peer closes (EOF or reset) with no further bytes, within `timeout`."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except ConnectionError:
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


# -- a service that closes every connection after one response -------------------------------


async def one_shot_service() -> asyncio.Server:
    """A service that answers `200 ok` and then closes the connection, without saying so in
    a `Connection: close` header (the node learns it only when the connection ends)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def crashing_service() -> tuple[asyncio.Server, list[int]]:
    """A service that reads a request head and then resets the connection (a crash while
    handling it). Returns the server and a one-element list counting the requests it saw."""
    seen = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            seen[0] += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        # Linger 0: the close sends RST, as when a process dies with the connection open.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    return await asyncio.start_server(handle, "127.0.0.1", 0), seen
