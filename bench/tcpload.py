"""The TCP bench's two programs: a loopback service and a load generator (uvloop Protocols).

`python -m bench.tcpload serve HOST PORT SIZE`: each connection's first byte chooses what it
gets: `D` (download) is answered with SIZE bytes and a FIN; `U` (upload) is followed by the
client's bytes, which are read and dropped until its FIN, then the service closes. Nothing is
parsed and nothing is copied in Python: one preallocated payload, one shared read buffer.

`python -m bench.tcpload load HOST PORT SIZE DIRECTION CONNECTIONS SECONDS` keeps CONNECTIONS
transfers of SIZE bytes in flight for SECONDS, each on a new TCP connection (connect, move
SIZE bytes one way, wait for the other side's close), and prints one JSON line: completed
transfers, their bytes, the time, its own CPU seconds (to show it is not the bottleneck) and
errors (a transfer that ended short). Transfers still in flight at the end are not counted.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import cast

DOWN = b"D"
UP = b"U"
# Big reads: few callbacks per MiB (the kernel fills what it has).
_READ_BUFFER = 1 << 20


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # plain asyncio works too, just slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class ServiceConnection(asyncio.BufferedProtocol):
    """One connection to the service: a source (D) or a sink (U)."""

    def __init__(self, payload: bytes, buffer: bytearray) -> None:
        self.payload = payload
        self.buffer = memoryview(buffer)
        self.transport: asyncio.Transport | None = None
        self.mode = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are no subclass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer  # shared by every connection: what is read is dropped

    def buffer_updated(self, nbytes: int) -> None:
        if self.mode or self.transport is None:
            return
        self.mode = bytes(self.buffer[:1])
        if self.mode == DOWN:
            self.transport.write(self.payload)
            self.transport.write_eof()

    def eof_received(self) -> bool:
        if self.transport is not None:
            self.transport.close()  # an upload is complete (or a download's client left)
        return False


async def serve(host: str, port: int, size: int) -> None:
    payload = bytes(size)
    buffer = bytearray(_READ_BUFFER)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: ServiceConnection(payload, buffer), host, port, backlog=1024
    )
    async with server:
        await server.serve_forever()


class ClientConnection(asyncio.BufferedProtocol):
    """One transfer: send the mode byte (and the upload), read until the service closes."""

    def __init__(self, mode: bytes, payload: bytes, buffer: bytearray) -> None:
        self.mode = mode
        self.payload = payload
        self.buffer = memoryview(buffer)
        self.received = 0
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        if self.mode == DOWN:
            transport.write(DOWN)
        else:
            transport.writelines((UP, self.payload))
            transport.write_eof()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.received)


async def load(
    host: str, port: int, size: int, direction: str, connections: int, seconds: float
) -> dict[str, float]:
    mode = DOWN if direction == "down" else UP
    payload = bytes(size)
    loop = asyncio.get_running_loop()
    transfers = errors = 0
    deadline = loop.time() + seconds

    async def worker() -> None:
        nonlocal transfers, errors
        buffer = bytearray(_READ_BUFFER)
        while loop.time() < deadline:
            try:
                transport, proto = await loop.create_connection(
                    lambda: ClientConnection(mode, payload, buffer), host, port
                )
            except OSError:
                errors += 1
                continue
            try:
                received = await asyncio.wait_for(proto.done, max(0.1, deadline - loop.time()))
            except TimeoutError:
                transport.abort()
                return  # cut by the end of the run: not counted
            transport.close()
            if loop.time() > deadline:
                return
            if received == (size if mode == DOWN else 0):
                transfers += 1
            else:
                errors += 1

    started = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "transfers": transfers,
        "bytes": transfers * size,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "errors": errors,
    }


def main(argv: list[str]) -> int:
    _use_uvloop()
    if argv[:1] == ["serve"] and len(argv) == 4:
        asyncio.run(serve(argv[1], int(argv[2]), int(argv[3])))
        return 0
    if argv[:1] == ["load"] and len(argv) == 7:
        host, port, size, direction, connections, seconds = argv[1:]
        if direction not in ("down", "up"):
            print("direction: down or up", file=sys.stderr)
            return 2
        result = asyncio.run(
            load(host, int(port), int(size), direction, int(connections), float(seconds))
        )
        print(json.dumps(result))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
