"""Raw TCP services for the TCP tunnel tests: an echo, and two that test half-close."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from dataclasses import dataclass, field


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


async def echo_service(host: str = "127.0.0.1", port: int = 0) -> TcpService:
    """Echoes every byte; answers a FIN with a FIN once everything is echoed."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, host, port)
    return TcpService(server)


async def digest_after_eof_service(host: str = "127.0.0.1", port: int = 0) -> TcpService:
    """Reads until the client's FIN, then answers `<bytes> <sha256>` and closes: the answer
    comes only if the FIN arrived while the client still reads."""
    service: TcpService

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest = hashlib.sha256()
        size = 0
        try:
            while data := await reader.read(256 * 1024):
                digest.update(data)
                size += len(data)
            service.received.append(b"%d" % size)
            writer.write(b"%d %s\n" % (size, digest.hexdigest().encode()))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    service = TcpService(await asyncio.start_server(serve, host, port))
    return service


async def greet_then_listen_service(host: str = "127.0.0.1", port: int = 0) -> TcpService:
    """Sends `hello`, then its FIN, then keeps reading until the client's FIN: what it read
    is in `received` (the client may still send after the service closed its side)."""
    service: TcpService

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"hello")
            writer.write_eof()
            await writer.drain()
            service.received.append(await reader.read())
        except ConnectionError:
            pass
        finally:
            writer.close()

    service = TcpService(await asyncio.start_server(serve, host, port))
    return service


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
    # `python -m tests.support.tcp_services KIND HOST PORT`: serve until killed.
    asyncio.run(_serve(sys.argv[1], sys.argv[2], int(sys.argv[3])))
