"""A stopping node and the WebSockets open through it (issue 10, item 11).

The node cannot speak WebSocket inside a spliced connection. It ends the service's side (a
FIN through the tunnel) as soon as it starts draining, so a service can send its own close
frame; what is left at the end of `server.graceful_shutdown_timeout` is closed with a FIN.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib

import aiohttp

from pico.server.node import Node
from tests.support.cluster import Harness, proxy_url

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
GOING_AWAY = b"\x88\x02\x03\xe9"  # a close frame, code 1001


class WebSocketService(asyncio.Protocol):
    """Accepts one WebSocket upgrade; when its connection's read side ends, sends a close
    frame 1001 and closes (`polite`), or ignores it (a service that never says goodbye)."""

    def __init__(self, polite: bool, eofs: list[bool]) -> None:
        self.polite = polite
        self.eofs = eofs
        self.head = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in self.head:
            return  # frames from the client: not needed here
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        key = next(
            line.split(b":", 1)[1].strip()
            for line in self.head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )

    def eof_received(self) -> bool:
        self.eofs.append(True)
        if self.polite and self.transport is not None:
            self.transport.write(GOING_AWAY)
            self.transport.close()
        return True


async def websocket_through(h: Harness, polite: bool, grace: str) -> tuple[Node, list[bool]]:
    loop = asyncio.get_running_loop()
    eofs: list[bool] = []
    service = await loop.create_server(lambda: WebSocketService(polite, eofs), "127.0.0.1", 0)
    h.closers.append(service.close)
    node = await h.node(server={"graceful_shutdown_timeout": grace})
    await h.agent(node, [f"ep/127.0.0.1:{service.sockets[0].getsockname()[1]}"])
    await h.tunnel_up(node, "ep")
    return node, eofs


async def test_a_stopping_node_lets_the_service_close_its_websockets_at_once(h: Harness) -> None:
    node, eofs = await websocket_through(h, polite=True, grace="30s")
    loop = asyncio.get_running_loop()
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(proxy_url(node) + "/ws", headers={"x-pico-endpoint": "ep"}) as ws,
    ):
        started = loop.time()
        shutdown = loop.create_task(node.shutdown())
        # Well before the 30 s grace period: the service saw its connection end and said
        # goodbye with its own close frame, which reached the client.
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001
        assert eofs == [True]
        await asyncio.wait_for(shutdown, 10)
        assert loop.time() - started < 10


async def test_websockets_left_at_the_end_of_the_grace_period_are_closed_cleanly(
    h: Harness,
) -> None:
    node, eofs = await websocket_through(h, polite=False, grace="1s")
    assert node.addrs is not None
    reader, writer = await asyncio.open_connection(*node.addrs.proxy)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: ep\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 ")
    shutdown = asyncio.get_running_loop().create_task(node.shutdown())
    # The service ignored its end of stream; at the end of the grace period the client's
    # connection ends with a FIN (EOF), not a reset.
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert eofs == [True]
    await asyncio.wait_for(shutdown, 10)
    writer.close()
