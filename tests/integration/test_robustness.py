"""Hostile or broken peers: services, clients, agents and nodes that misbehave."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from pico.mux.frame import Flags, FrameType, encode_header
from pico.mux.handshake import open_websocket
from pico.mux.stream import MuxStream
from pico.mux.tunnel import Tunnel
from pico.mux.upgrade import accept_response
from pico.mux.websocket import OP_BINARY, encode_frame
from pico.server.cluster import NodeInfo
from tests.support.cluster import Harness, admin_url, proxy_url, wait_for

EP = {"x-pico-endpoint": "ep"}
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class FakeService:
    """A raw TCP service for one test; `close()` ends it and every connection it accepted."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.add(writer)
            try:
                await self.handler(reader, writer)
            finally:
                writer.close()

        self.server = await asyncio.start_server(tracked, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()


async def serve(handler: Handler) -> tuple[FakeService, int]:
    service = FakeService(handler)
    return service, await service.start()


async def test_post_that_reached_a_crashing_service_is_never_sent_twice(h: Harness) -> None:
    posts = [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"POST"):
                    posts[0] += 1
                    writer.transport.abort()  # crashed while handling it
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()

    server, port = await serve(handler)
    node = await h.node()
    await h.agent(node, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep")
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(node), headers=EP) as resp:  # leaves a pooled stream
            assert resp.status == 200
        async with http.post(proxy_url(node), data=b"pay", headers=EP) as resp:
            assert resp.status == 502
    assert posts == [1]
    server.close()


async def test_endless_response_head_from_a_service_gets_502(h: Harness) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nX-Junk: ")
            for _ in range(64):  # 4 MiB of one header value, never finished
                writer.write(b"j" * 65536)
                await writer.drain()

    server, port = await serve(handler)
    node = await h.node()
    await h.agent(node, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep")
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(node), headers=EP) as resp:
            assert resp.status == 502
    server.close()


async def client_of_service(
    h: Harness, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
) -> tuple[asyncio.Server, asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw service, a node with an agent for it as endpoint `ep`, and a client connection to
    the node's proxy port."""
    server, port = await serve(handler)
    node = await h.node()
    await h.agent(node, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep")
    assert node.addrs is not None
    reader, writer = await asyncio.open_connection(*node.addrs.proxy)
    return server, reader, writer


REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: ep\r\n\r\n"


async def test_stray_bytes_after_a_response_are_never_served(h: Harness) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                # One response, then a second nobody asked for, in the same write.
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"
                )
                await writer.drain()

    server, reader, writer = await client_of_service(h, handler)
    for _ in range(3):  # one client connection: any stray byte would show up as a response
        writer.write(REQUEST)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 2" in head
        assert await asyncio.wait_for(reader.readexactly(2), 10) == b"hi"
    writer.close()
    await writer.wait_closed()
    server.close()


async def test_stray_bytes_after_a_body_relayed_past_the_parser_are_never_served(
    h: Harness,
) -> None:
    # The body's second part (and a stray response after it) arrives after the head was
    # relayed, so it takes the path that skips the parser: the stray bytes are still caught.
    head_seen = asyncio.Event()
    connections = [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nh")
                await writer.drain()
                await head_seen.wait()
                head_seen.clear()
                writer.write(b"iHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
                await writer.drain()

    server, reader, writer = await client_of_service(h, handler)
    for _ in range(3):
        writer.write(REQUEST)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 2" in head
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"h"
        head_seen.set()
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"i"
    # A stream that carried stray bytes is never reused: each request had a fresh one.
    assert connections[0] == 3
    writer.close()
    await writer.wait_closed()
    server.close()


async def test_invalid_endpoint_id_gets_400(h: Harness) -> None:
    node = await h.node()
    async with aiohttp.ClientSession() as http:
        headers = {"x-pico-endpoint": "<script>"}
        async with http.get(proxy_url(node), headers=headers) as resp:
            assert resp.status == 400
            assert await resp.json() == {"error": "invalid endpoint id"}
    assert node.metrics.proxy.by_endpoint == {}


async def test_endless_header_on_the_upstream_port_gets_431(h: Harness) -> None:
    node = await h.node()
    assert node.addrs is not None
    reader, writer = await asyncio.open_connection(*node.addrs.upstream)
    writer.write(b"GET /pico/v1/upstream/ep HTTP/1.1\r\nX-Junk: " + b"j" * 100_000)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 431 ")


async def test_admin_forward_to_a_node_advertising_a_wrong_address_does_not_loop(
    h: Harness,
) -> None:
    node = await h.node()
    assert node.addrs is not None
    host, port = node.addrs.admin
    # A peer whose advertised admin address leads back to us (e.g. a load balancer).
    node.cluster.remotes["ghost"] = NodeInfo("ghost", "10.0.0.9:8000", f"{host}:{port}")
    async with aiohttp.ClientSession() as http:
        async with http.get(admin_url(node) + "/status/cluster/nodes?forward=ghost") as resp:
            assert resp.status == 508


async def test_agent_reads_frames_the_node_sends_right_after_the_upgrade() -> None:
    # A node with a request waiting opens a stream the moment the tunnel is up: its first
    # frames may arrive in the same packet as the 101, or just after.
    syn = encode_header(FrameType.WINDOW_UPDATE, Flags.SYN, 2, 0)
    data = encode_header(FrameType.DATA, Flags(0), 2, 5) + b"hello"

    second_sent = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key")
        )
        writer.write(accept_response(key) + encode_frame(OP_BINARY, syn, mask=False))
        await writer.drain()
        writer.write(encode_frame(OP_BINARY, data, mask=False))
        await writer.drain()
        second_sent.set()
        await reader.read()  # until the test closes

    server, port = await serve(handler)
    transport, rest = await open_websocket(f"ws://127.0.0.1:{port}/pico/v1/upstream/ep")
    await second_sent.wait()  # both frames are on their way before the tunnel takes over
    received: list[bytes] = []

    class Receiver:
        def data_received(self, chunk: bytes) -> None:
            received.append(chunk)

        def eof_received(self) -> None: ...
        def connection_lost(self, reason: object) -> None: ...
        def pause_writing(self) -> None: ...
        def resume_writing(self) -> None: ...

    def on_stream(stream: MuxStream) -> None:
        stream.set_receiver(Receiver())

    tunnel = Tunnel(client=True, on_stream=on_stream)
    tunnel.attach(transport, rest, resume=True)
    await wait_for(lambda: b"".join(received) == b"hello", what="stream data delivered")
    tunnel.close()
    server.close()


async def test_body_bytes_in_the_same_read_as_the_head_never_count_as_head(h: Harness) -> None:
    # Once the stream's window has grown, a whole 1 MiB response (head and body) can arrive
    # in one piece: only the head counts against the response head limit.
    node, _, _ = await h.with_service()
    size = 1024 * 1024
    async with aiohttp.ClientSession() as http:
        for _ in range(6):
            async with http.get(proxy_url(node) + f"/download?size={size}", headers=EP) as resp:
                assert resp.status == 200
                assert len(await resp.read()) == size


async def test_a_node_that_never_answers_the_upgrade_times_out_and_is_hung_up_on() -> None:
    heard_close = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the upgrade request, never answered
        await reader.read()  # until the agent gives up and closes
        heard_close.set()

    server, port = await serve(handler)
    try:
        with pytest.raises(TimeoutError):
            await open_websocket(f"ws://127.0.0.1:{port}/pico/v1/upstream/ep", timeout=0.2)
        await asyncio.wait_for(heard_close.wait(), 5)
    finally:
        server.close()
