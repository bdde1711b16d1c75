"""Hostile clients of the TCP route `/_pico/v1/tcp/{id}`: what they are answered, and what
they cannot make a node hold for them."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Mapping

import pytest

from pico.mux.websocket import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, FrameDecoder, encode_frame
from pico.server.node import Node
from tests.support.cluster import Harness, connect, wait_for
from tests.support.tcp_services import echo_service

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade_request(
    endpoint: str, method: str = "GET", changes: Mapping[str, str | None] | None = None
) -> bytes:
    """A WebSocket upgrade of the TCP route; `changes` replace fields, or leave them out
    where they are None."""
    fields: dict[str, str | None] = {
        "Host": "node",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
        **(changes or {}),
    }
    lines = [f"{method} /_pico/v1/tcp/{endpoint} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in fields.items() if value is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def tcp_endpoint(h: Harness, node: Node, endpoint: str, port: int) -> None:
    await h.tcp_agent(node, endpoint, port)
    await h.tunnel_up(node, endpoint)


async def echo_endpoint(h: Harness, endpoint: str) -> Node:
    """A node with an echo service registered as TCP endpoint `endpoint`."""
    node = await h.node()
    service = await echo_service()
    h.closers.append(service.close)
    await tcp_endpoint(h, node, endpoint, service.port)
    return node


@pytest.mark.parametrize(
    ("method", "changes", "message"),
    [
        ("GET", {"Sec-WebSocket-Key": None}, "missing Sec-WebSocket-Key"),
        (
            "GET",
            {"Sec-WebSocket-Key": "not base64!"},
            "invalid Sec-WebSocket-Key (expected 16 bytes in base64)",
        ),
        (
            "GET",
            {"Sec-WebSocket-Key": "c2hvcnQ="},  # base64, but of 5 bytes
            "invalid Sec-WebSocket-Key (expected 16 bytes in base64)",
        ),
        (
            "GET",
            {"Sec-WebSocket-Version": "8"},
            "unsupported Sec-WebSocket-Version (expected 13)",
        ),
        (
            "GET",
            {"Sec-WebSocket-Version": None},
            "unsupported Sec-WebSocket-Version (expected 13)",
        ),
        ("POST", {}, "expected GET for a WebSocket upgrade"),
    ],
    ids=["no-key", "key-not-base64", "key-too-short", "version-8", "no-version", "post"],
)
async def test_a_bad_websocket_handshake_on_the_tcp_route_gets_400_and_the_rule_it_broke(
    h: Harness, method: str, changes: dict[str, str | None], message: str
) -> None:
    conn = await connect(await echo_endpoint(h, "my-db"))
    try:
        await conn.send(upgrade_request("my-db", method, changes))
        resp = await conn.read_response()
        assert resp.status == 400
        assert resp.header("content-type") == "application/json"
        assert json.loads(resp.body) == {"error": message}
        assert await conn.closed_by_peer()
    finally:
        await conn.close()


async def test_a_client_that_pings_without_reading_is_not_queued_a_pong_per_ping(
    h: Harness,
) -> None:
    node = await h.node()
    received = bytearray()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Reads everything and answers nothing; closes at the client's FIN."""
        try:
            while data := await reader.read(1 << 16):
                received.extend(data)
        finally:
            writer.close()

    service = await asyncio.start_server(sink, "127.0.0.1", 0)
    h.closers.append(service.close)
    await tcp_endpoint(h, node, "sink", int(service.sockets[0].getsockname()[1]))
    assert node.addrs is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, node.addrs.proxy)
    # A small limit: the stream stops reading the socket after a few KiB it was not asked for.
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    try:
        writer.write(upgrade_request("sink"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 ")
        pings, batch = 100_000, encode_frame(OP_PING, b"p" * 125, mask=True) * 1000
        for _ in range(pings // 1000):  # 13 MB of pings, each owed a 127-byte pong
            writer.write(batch)
            await writer.drain()
        writer.write(encode_frame(OP_BINARY, b"sent", mask=True))
        await writer.drain()
        await wait_for(lambda: received.endswith(b"sent"), what="the node read every ping")
        # Our Close ends the service's input; its FIN ends the connection, after whatever the
        # node kept for us.
        writer.write(encode_frame(OP_CLOSE, struct.pack(">H", 1000), mask=True))
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    _, controls = FrameDecoder(expect_mask=False).feed(data)
    pongs = sum(1 for c in controls if c.opcode == OP_PONG)
    assert controls[-1].opcode == OP_CLOSE
    # What socket buffers and the write high-water mark hold, and one pong owed at the end:
    # far fewer than one per ping.
    assert pongs < pings // 2


async def test_an_absolute_form_upgrade_reaches_the_tcp_endpoint_its_path_names(
    h: Harness,
) -> None:
    conn = await connect(await echo_endpoint(h, "my-db"))
    try:
        request = upgrade_request("my-db").replace(
            b"GET /_pico/", b"GET http://web.example.com/_pico/", 1
        )
        await conn.send(request + encode_frame(OP_BINARY, b"hello", mask=True))
        resp = await conn.read_head()
        assert resp.status == 101
        frames = await asyncio.wait_for(conn.reader.readexactly(7), 10)
        payloads, _ = FrameDecoder(expect_mask=False).feed(frames)
        assert b"".join(payloads) == b"hello"  # echoed by the TCP service
    finally:
        await conn.close()
