"""Raw TCP services for the TCP tunnel tests: an echo, and two that test half-close.

`python -m tests.support.tcp_services KIND HOST PORT` serves one (echo, digest, greet) until
killed, for the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class TcpService:
    """A running service: its port, and what it saw of each connection it served."""

    server: asyncio.Server
    received: list[bytes] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        self.server.close()


async def _start(handler: Handler, host: str, port: int, service: list[TcpService]) -> TcpService:
    """Serve `handler` (a peer that resets is not an error; the connection is always closed)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    started = TcpService(await asyncio.start_server(serve, host, port))
    service.append(started)
    return started


async def echo_service(host: str = "127.0.0.1", port: int = 0) -> TcpService:
    """Echoes every byte; answers a FIN with a FIN once everything is echoed."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()

    return await _start(echo, host, port, [])


async def digest_after_eof_service(host: str = "127.0.0.1", port: int = 0) -> TcpService:
    """Reads until the client's FIN, then answers `<bytes> <sha256>` and closes: the answer
    comes only if the FIN arrived while the client still reads."""
    me: list[TcpService] = []

    async def digest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sha = hashlib.sha256()
        size = 0
        while data := await reader.read(256 * 1024):
            sha.update(data)
            size += len(data)
        me[0].received.append(b"%d" % size)
        writer.write(b"%d %s\n" % (size, sha.hexdigest().encode()))
        await writer.drain()

    return await _start(digest, host, port, me)


async def greet_then_listen_service(host: str = "127.0.0.1", port: int = 0) -> TcpService:
    """Sends `hello`, then its FIN, then keeps reading until the client's FIN: what it read
    is in `received` (the client may still send after the service closed its side)."""
    me: list[TcpService] = []

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        writer.write_eof()
        await writer.drain()
        me[0].received.append(await reader.read())

    return await _start(greet, host, port, me)


async def _serve(kind: str, host: str, port: int) -> None:
    factories = {
        "echo": echo_service,
        "digest": digest_after_eof_service,
        "greet": greet_then_listen_service,
    }
    service = await factories[kind](host, port)
    async with service.server:
        await service.server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], sys.argv[2], int(sys.argv[3])))
