"""Proxy engine conformance: request and response bodies, framing, keep-alive and pipelining.

Raw sockets where the exact bytes matter; aiohttp's client for bulk transfers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from pico.server.node import Node
from tests.support.cluster import Harness, connect, proxy_url
from tests.support.services import PEERS, pattern

HOST = b"Host: ep.example.com\r\n"


async def start(h: Harness) -> tuple[Node, web.Application]:
    node, _, app = await h.with_service()
    return node, app


async def test_content_length_request_body_reaches_service_intact(h: Harness) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    body = b"hello, world\r\n\r\n0\r\n"  # looks like framing, is only data
    await conn.send(b"POST /echo HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n" % len(body))
    await conn.send(body)
    resp = await conn.read_response()
    assert resp.status == 200
    assert resp.body == body
    assert resp.header("x-method") == "POST"
    await conn.close()


async def test_chunked_request_body_reaches_service_intact(h: Harness) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(
        b"POST /echo HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n"
        b"1;ext=1\r\n,\r\n"
        b"6\r\n world\r\n"
    )
    await conn.send(b"0\r\n\r\n")
    resp = await conn.read_response()
    assert resp.status == 200
    assert resp.body == b"hello, world"
    await conn.close()


async def test_chunked_response_reaches_client_chunked_and_intact(h: Harness) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(b"GET /chunked HTTP/1.1\r\n" + HOST + b"\r\n")
    resp = await conn.read_response()
    assert resp.status == 200
    assert resp.chunked
    assert resp.header("content-length") is None
    assert resp.body == b"part0;part1;part2;part3;part4;"
    await conn.close()


async def test_zero_byte_bodies_both_ways_keep_the_connection_usable(h: Harness) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(b"POST /echo HTTP/1.1\r\n" + HOST + b"Content-Length: 0\r\n\r\n")
    resp = await conn.read_response()
    assert (resp.status, resp.header("content-length"), resp.body) == (200, "0", b"")
    await conn.send(
        b"POST /echo HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    resp = await conn.read_response()
    assert (resp.status, resp.body) == (200, b"")
    await conn.send(b"GET /download?size=0&chunked=1 HTTP/1.1\r\n" + HOST + b"\r\n")
    resp = await conn.read_response()
    assert (resp.status, resp.body) == (200, b"")
    await conn.send(b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
    assert (await conn.read_response()).body == b"hello"
    await conn.close()


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_multi_megabyte_upload_streams_intact_with_both_framings(h: Harness) -> None:
    node, _ = await start(h)
    data = pattern(6 * 1024 * 1024 + 13)
    async with aiohttp.ClientSession() as http:
        headers = {"x-pico-endpoint": "ep"}
        async with http.post(proxy_url(node) + "/count", data=data, headers=headers) as resp:
            assert resp.status == 200
            assert await resp.text() == f"{len(data)} ok"
        # An async generator body is sent chunked.
        body = _chunks(data, 100_000)
        async with http.post(proxy_url(node) + "/count", data=body, headers=headers) as resp:
            assert resp.status == 200
            assert await resp.text() == f"{len(data)} ok"


async def test_multi_megabyte_download_streams_intact_with_both_framings(h: Harness) -> None:
    node, _ = await start(h)
    size = 8 * 1024 * 1024 + 7
    async with aiohttp.ClientSession() as http:
        headers = {"x-pico-endpoint": "ep"}
        for query in (f"size={size}", f"size={size}&chunked=1"):
            async with http.get(proxy_url(node) + "/download?" + query, headers=headers) as resp:
                assert resp.status == 200
                body = await resp.read()
            assert len(body) == size
            assert body == pattern(size)


async def test_expect_100_continue_gets_interim_response_then_final(h: Harness) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(
        b"POST /echo HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    )
    interim = await conn.read_head()
    assert interim.status == 100
    await conn.send(b"hello")
    resp = await conn.read_response()
    assert (resp.status, resp.body) == (200, b"hello")
    await conn.close()


async def test_head_response_has_headers_but_no_body_and_connection_is_reusable(
    h: Harness,
) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(b"HEAD /download?size=1000 HTTP/1.1\r\n" + HOST + b"\r\n")
    resp = await conn.read_response(head_request=True)
    assert resp.status == 200
    assert resp.header("content-length") == "1000"
    await conn.send(b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
    resp = await conn.read_response()
    assert (resp.status, resp.body) == (200, b"hello")  # no stray body bytes came first
    await conn.close()


async def test_204_and_304_have_no_body_and_connection_is_reusable(h: Harness) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    for code in (204, 304, 204):
        await conn.send(b"GET /status/%d HTTP/1.1\r\n" % code + HOST + b"\r\n")
        resp = await conn.read_response()
        assert resp.status == code
        assert resp.header("transfer-encoding") is None
    await conn.send(b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
    assert (await conn.read_response()).body == b"hello"
    await conn.close()


async def test_http10_client_gets_response_and_connection_is_closed(h: Harness) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(b"GET / HTTP/1.0\r\n" + HOST + b"\r\n")
    resp = await conn.read_response()
    assert (resp.status, resp.body) == (200, b"hello")
    assert await conn.closed_by_peer()
    await conn.close()


async def test_chunked_response_is_dechunked_for_http10_client(h: Harness) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(b"GET /chunked HTTP/1.0\r\n" + HOST + b"\r\n")
    resp = await conn.read_response()  # no framing header: the body ends at close
    assert resp.status == 200
    assert resp.header("transfer-encoding") is None
    assert resp.body == b"part0;part1;part2;part3;part4;"
    await conn.close()


async def test_pipelined_requests_get_responses_in_order(h: Harness) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(
        b"GET /slow?delay=0.2 HTTP/1.1\r\n" + HOST + b"\r\n"
        b"POST /echo?n=2 HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\n\r\nabc"
        b"GET /chunked HTTP/1.1\r\n" + HOST + b"\r\n"
    )
    first = await conn.read_response()
    second = await conn.read_response()
    third = await conn.read_response()
    assert (first.status, first.body) == (200, b"slow")
    assert (second.header("x-path"), second.body) == ("/echo?n=2", b"abc")
    assert third.body == b"part0;part1;part2;part3;part4;"
    await conn.close()


async def test_requests_up_to_a_connection_close_are_answered_and_the_rest_dropped(
    h: Harness,
) -> None:
    """Bytes after a `Connection: close` request once made llhttp fail the whole connection:
    the request already sent to the service got a 400 instead of its answer."""
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(
        b"GET /echo?n=1 HTTP/1.1\r\n" + HOST + b"\r\n"
        b"GET /echo?n=2 HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"
        b"GET /echo?n=3 HTTP/1.1\r\n" + HOST + b"\r\n"
    )
    first = await conn.read_response()
    second = await conn.read_response()
    assert [(r.status, r.header("x-path")) for r in (first, second)] == [
        (200, "/echo?n=1"),
        (200, "/echo?n=2"),
    ]
    assert second.header("connection") == "close"
    assert await conn.closed_by_peer()
    await conn.close()


async def test_an_error_answer_to_head_has_no_body_and_keeps_the_connection_in_step(
    h: Harness,
) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    await conn.send(
        b"HEAD / HTTP/1.1\r\nHost: nope.example.com\r\n\r\nGET / HTTP/1.1\r\n" + HOST + b"\r\n"
    )
    head = await conn.read_response(head_request=True)
    assert head.status == 502 and head.header("content-type") == "application/json"
    after = await conn.read_response()
    assert (after.status, after.body) == (200, b"hello")
    await conn.close()


async def test_client_connection_is_kept_alive_across_requests(h: Harness) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    for i in range(5):
        await conn.send(b"GET /echo?i=%d HTTP/1.1\r\n" % i + HOST + b"\r\n")
        resp = await conn.read_response()
        assert resp.header("x-path") == f"/echo?i={i}"
        assert resp.header("connection") is None
    assert len(node.connections) == 1
    await conn.close()


async def test_node_reuses_idle_tunnel_streams_for_new_client_connections(h: Harness) -> None:
    node, app = await start(h)
    # A fresh client connection per request: any reuse is the node's, on the tunnel side.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(10):
            async with http.get(proxy_url(node), headers={"x-pico-endpoint": "ep"}) as resp:
                assert await resp.text() == "hello"
    assert 1 <= len(app[PEERS]) < 10


async def test_many_pipelined_requests_answered_at_once_are_all_answered_in_order(
    h: Harness,
) -> None:
    node, _ = await start(h)
    conn = await connect(node)
    n = 3000
    # Queued behind a slow request; each is then answered by the node itself (502).
    other = b"GET /%d HTTP/1.1\r\nHost: nope.example.com\r\nx-pico-endpoint: nope\r\n\r\n"
    await conn.send(
        b"GET /slow?delay=0.3 HTTP/1.1\r\n" + HOST + b"\r\n" + b"".join(other % i for i in range(n))
    )
    assert (await conn.read_response()).body == b"slow"
    for _ in range(n):
        resp = await conn.read_response()
        assert resp.status == 502
    await conn.send(b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
    assert (await conn.read_response()).body == b"hello"
    await conn.close()
