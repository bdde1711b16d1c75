"""Proxy engine conformance: peers that go away mid-message, and slow readers.

After every failure the node must stay healthy: no leaked streams or connections, and the next
request works.
"""

from __future__ import annotations

import asyncio

from pico.agent.agent import Agent
from pico.mux.stream import MuxStream
from pico.mux.tunnel import DEFAULT_MAX_WINDOW
from pico.server.node import Node
from tests.support.cluster import Harness, connect, wait_for
from tests.support.services import RawConnection, pattern

HOST = b"Host: ep.example.com\r\n"


async def start(h: Harness) -> tuple[Node, Agent]:
    node, running, _ = await h.with_service()
    return node, running.agent


def busy_streams(node: Node) -> list[MuxStream]:
    """Tunnel streams that are neither closed nor parked in the idle keep-alive pool."""
    busy = []
    for up in node.upstream_server.tunnels():
        idle = {id(stream) for _, stream in up._idle}
        busy += [s for s in up.tunnel.streams.values() if id(s) not in idle]
    return busy


async def assert_healthy(node: Node) -> None:
    """No exchange or stream left behind, and a new request works."""
    await wait_for(lambda: not busy_streams(node), what="every tunnel stream idle or closed")
    await wait_for(lambda: len(node.connections) == 0, what="every client connection closed")
    conn = await connect(node)
    await conn.send(b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
    resp = await conn.read_response()
    assert (resp.status, resp.body) == (200, b"hello")
    await conn.close()
    await wait_for(lambda: not busy_streams(node), what="stream of the check request released")


async def test_client_disconnecting_mid_request_body_leaves_node_healthy(h: Harness) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(b"POST /count HTTP/1.1\r\n" + HOST + b"Content-Length: 10000000\r\n\r\n")
    await conn.send(pattern(300_000))
    await wait_for(lambda: bool(busy_streams(node)), what="request in flight")
    await conn.close()
    await assert_healthy(node)


async def test_client_disconnecting_mid_chunked_request_body_leaves_node_healthy(
    h: Harness,
) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(b"POST /count HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n")
    await conn.send(b"10000\r\n" + pattern(0x10000) + b"\r\n")
    await wait_for(lambda: bool(busy_streams(node)), what="request in flight")
    await conn.close()
    await assert_healthy(node)


async def test_client_disconnecting_mid_response_body_leaves_node_healthy(h: Harness) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(b"GET /download?size=100000000 HTTP/1.1\r\n" + HOST + b"\r\n")
    head = await conn.read_head()
    assert head.status == 200
    await conn.reader.readexactly(200_000)
    await conn.close()
    await assert_healthy(node)


async def test_client_half_close_mid_request_body_ends_the_exchange(h: Harness) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(b"POST /count HTTP/1.1\r\n" + HOST + b"Content-Length: 1000000\r\n\r\n")
    await conn.send(pattern(1000))
    await wait_for(lambda: bool(busy_streams(node)), what="request in flight")
    conn.writer.write_eof()  # the rest of the body can never arrive
    assert await conn.closed_by_peer(timeout=5)
    await conn.close()
    await assert_healthy(node)


async def test_service_disconnecting_mid_body_aborts_the_client_connection(h: Harness) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(b"GET /broken?size=1000000&after=1000 HTTP/1.1\r\n" + HOST + b"\r\n")
    head = await conn.read_head()
    assert head.status == 200
    assert head.header("content-length") == "1000000"
    received = b""
    while chunk := await asyncio.wait_for(conn.reader.read(65536), 10):
        received += chunk
    assert len(received) < 1_000_000  # cut short: the client can tell it failed
    await conn.close()
    await assert_healthy(node)


async def test_service_disconnecting_mid_chunked_body_aborts_the_client_connection(
    h: Harness,
) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(b"GET /broken?chunked=1&after=1000 HTTP/1.1\r\n" + HOST + b"\r\n")
    head = await conn.read_head()
    assert head.status == 200
    assert head.header("transfer-encoding") == "chunked"
    data = await asyncio.wait_for(conn.reader.read(-1), 10)
    assert not data.endswith(b"0\r\n\r\n")  # no last chunk: the client can tell it failed
    await conn.close()
    await assert_healthy(node)


async def test_slow_reader_keeps_node_buffers_bounded_and_download_completes(
    h: Harness,
) -> None:
    node, agent = await start(h)
    size = 200 * 1024 * 1024
    # A small reader buffer: once the client stops reading, the kernel buffers fill quickly.
    assert node.addrs is not None
    conn = await RawConnection.open(*node.addrs.proxy, limit=64 * 1024)
    await conn.send(b"GET /download?size=%d HTTP/1.1\r\n" % size + HOST + b"\r\n")
    head = await conn.read_head()
    assert head.status == 200
    got = 0
    expected = pattern(1024 * 1024)
    # Read the first few MB at full speed (lets the mux window grow), then stop reading.
    while got < 4 * 1024 * 1024:
        chunk = await conn.reader.read(65536)
        assert chunk == expected[got % 251 : got % 251 + len(chunk)]
        got += len(chunk)

    def agent_blocked() -> bool:
        # Flow control reached the agent: its stream holds bytes the node has no window for
        # or, splicing, it has no window left and stopped reading the service.
        tunnel = agent.links[0].tunnel
        return tunnel is not None and any(
            s.get_write_buffer_size() > 0 or s.send_window() == 0 for s in tunnel.streams.values()
        )

    await wait_for(agent_blocked, what="the agent stopped by the mux window")
    (proxy_conn,) = node.connections.snapshot()
    assert proxy_conn.transport is not None
    buffered = proxy_conn.transport.get_write_buffer_size()
    # At most one stream window plus the client write buffer's high-water mark, whatever the
    # size of the download.
    bound = DEFAULT_MAX_WINDOW + node.limits.write_high_water + 256 * 1024
    assert buffered <= bound, f"node buffers {buffered} bytes for a paused client"
    assert bound < 6 * 1024 * 1024
    # Resume: the whole download arrives intact.
    while got < size:
        chunk = await asyncio.wait_for(conn.reader.read(1 << 20), 10)
        assert chunk, f"connection closed after {got} bytes"
        offset = got % 251
        assert chunk[:1000] == expected[offset : offset + min(1000, len(chunk))]
        got += len(chunk)
    assert got == size
    await conn.close()
    await assert_healthy(node)


async def test_pipelined_downloads_to_a_stalling_reader_both_complete(h: Harness) -> None:
    node, _ = await start(h)
    size = 3 * 1024 * 1024
    assert node.addrs is not None
    conn = await RawConnection.open(*node.addrs.proxy, limit=64 * 1024)
    request = b"GET /download?size=%d HTTP/1.1\r\n" % size + HOST + b"\r\n"
    await conn.send(request * 2)
    # Read nothing until the node has had to stop the first response at least once.
    await wait_for(
        lambda: any(c.write_paused for c in node.connections.snapshot()),
        what="client write buffer over its high-water mark",
    )
    for _ in range(2):
        resp = await conn.read_response(timeout=20)
        assert resp.status == 200
        assert resp.body == pattern(size)
    await conn.close()
    await assert_healthy(node)
