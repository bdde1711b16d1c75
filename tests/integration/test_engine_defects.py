"""Defects a hostile review of the HTTP engine found, each pinned by a test that failed before
its fix: pipelines that grew memory, a retry that ended a chunked body twice, a service that
claimed its request was never delivered, routing changed by a Connection token, case-folded
endpoints losing their reconnect hold, half-closes and pipelined upgrades."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from pico.server.node import Node
from tests.integration.test_cluster import cluster
from tests.support.cluster import Harness, connect, wait_for
from tests.support.recorder import Recorder, start_recorder
from tests.support.services import sample_app

HOST = b"Host: ep.example.com\r\n"


async def raw_service(h: Harness, answer: bytes | None) -> int:
    """A service that reads requests and answers each with `answer` (None: never answers)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"Content-Length: 2" in head:
                    await reader.readexactly(2)
                if answer is not None:
                    writer.write(answer)
                    await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    h.closers.append(server.close)
    return int(server.sockets[0].getsockname()[1])


async def test_pipelined_heads_behind_a_stalled_request_pause_the_client(h: Harness) -> None:
    """Queued heads were counted as 0 bytes: a client could pipeline without limit."""
    node = await h.node()
    port = await raw_service(h, None)
    await h.agent(node, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep")
    conn = await connect(node)
    await conn.send(b"GET /first HTTP/1.1\r\n" + HOST + b"\r\n")
    pipelined = (b"GET /x HTTP/1.1\r\n" + HOST + b"X-Pad: " + b"a" * 4000 + b"\r\n\r\n") * 256
    sent = 0

    async def flood() -> None:
        nonlocal sent
        while sent < 64 << 20:
            conn.writer.write(pipelined)
            await conn.writer.drain()
            sent += len(pipelined)

    # The node stops reading at proxy.pipeline_limit (256 KiB): the writes block long before
    # 64 MiB, whatever the socket buffers hold.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(flood(), 5)
    assert sent < 32 << 20, f"{sent} bytes were read without back-pressure"
    conn.writer.transport.abort()


async def test_a_retried_chunked_request_ends_its_body_once(h: Harness) -> None:
    """A retry replayed the last chunk and trailers, then sent them again."""
    node = await h.node()
    rec = await start_recorder()
    try:
        await retry_chunked_puts(h, node, rec)
    finally:
        await rec.close()


async def retry_chunked_puts(h: Harness, node: Node, rec: Recorder) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    await h.agent(node, [f"ep/127.0.0.1:{dead}"])
    await h.agent(node, [f"ep/127.0.0.1:{rec.port}"])
    await h.tunnel_up(node, "ep", count=2)
    for _ in range(2):  # round robin: one of them tries the dead upstream first
        conn = await connect(node)
        await conn.send(
            b"PUT /up HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"
        )
        resp = await conn.read_response()
        assert resp.status == 200, resp
        await conn.close()
    await rec.wait_requests(2)
    await rec.wait_settled()
    assert [(r.method, bytes(r.body), r.complete) for r in rec.requests] == [
        (b"PUT", b"hello", True),
        (b"PUT", b"hello", True),
    ]
    assert not rec.errors, rec.errors


async def test_a_service_cannot_claim_its_request_was_not_delivered(h: Harness) -> None:
    """A service's `x-pico-undelivered` made the forwarding node send a POST again."""
    a, b = await cluster(h, 2)
    port = await raw_service(
        h,
        b"HTTP/1.1 503 Service Unavailable\r\nx-pico-undelivered: true\r\n"
        b"Content-Length: 4\r\n\r\nbusy",
    )
    await h.agent(a, [f"ep/127.0.0.1:{port}"])
    await wait_for(lambda: b.cluster.remotes[a.node_id].endpoints.get("ep") == 1)
    conn = await connect(b)
    await conn.send(b"POST /pay HTTP/1.1\r\n" + HOST + b"Content-Length: 2\r\n\r\nhi")
    resp = await conn.read_response()
    assert (resp.status, resp.body) == (503, b"busy")
    assert resp.header("x-pico-undelivered") is None
    await conn.close()


async def test_a_connection_token_cannot_reroute_a_forwarded_request(h: Harness) -> None:
    a, b = await cluster(h, 2)
    port = await h.service(sample_app("ep-service"))
    await h.agent(a, [f"ep/127.0.0.1:{port}"])
    await wait_for(lambda: b.cluster.remotes[a.node_id].endpoints.get("ep") == 1)
    conn = await connect(b)
    await conn.send(
        b"GET /whoami HTTP/1.1\r\nHost: other.example.com\r\nx-pico-endpoint: ep\r\n"
        b"Connection: x-pico-endpoint\r\n\r\n"
    )
    resp = await conn.read_response()
    assert (resp.status, resp.body) == (200, b"ep-service")
    await conn.close()


async def test_a_request_may_wait_for_an_endpoint_lost_in_another_case(h: Harness) -> None:
    """The reconnect hold was keyed by the id as registered (`EP`), requests by `ep`."""
    node = await h.node()
    port = await h.service(sample_app())
    await h.agent(node, [f"EP/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep")
    (upstream,) = node.upstream_server.tunnels()
    node.upstream_server.accepting = False  # the agent's reconnects get 503 meanwhile
    upstream.tunnel.close("dropped by the test")  # not a goodbye: the agent will be back
    await wait_for(lambda: not node.upstream_server.tunnels(), what="the tunnel gone")
    waiter = node.router.wait_for_upstream("ep", lambda: None)
    assert waiter is not None, "a request for ep would get 502 at once instead of waiting"
    waiter.cancel()
    node.upstream_server.accepting = True


async def test_a_half_close_after_a_partial_pipelined_head_still_answers_the_first(
    h: Harness,
) -> None:
    node, _, _ = await h.with_service()
    conn = await connect(node)
    await conn.send(b"GET / HTTP/1.1\r\n" + HOST + b"\r\nGET /b HTTP/1.1\r\nHo")
    conn.writer.write_eof()
    resp = await conn.read_response()
    assert (resp.status, resp.body) == (200, b"hello")
    assert await conn.closed_by_peer()
    await conn.close()


async def test_an_upgrade_pipelined_behind_a_request_is_served(h: Harness) -> None:
    node, _, _ = await h.with_service()
    conn = await connect(node)
    await conn.send(
        b"GET / HTTP/1.1\r\n" + HOST + b"\r\n"
        b"GET /ws HTTP/1.1\r\n" + HOST + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    first = await conn.read_response()
    assert (first.status, first.body) == (200, b"hello")
    upgraded = await conn.read_head()
    assert upgraded.status == 101
    await conn.close()
