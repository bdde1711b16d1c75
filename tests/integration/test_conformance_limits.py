"""Proxy engine conformance: malformed and smuggling-prone requests, size and time limits,
and hop-by-hop header handling.

Malformed input gets a 400 JSON answer and a closed connection; nothing else is affected.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pico.server.node import Node
from tests.support.cluster import Harness, connect, wait_for

HOST = b"Host: ep.example.com\r\n"


async def start(h: Harness, **proxy: Any) -> Node:
    node, _, _ = await h.with_service(proxy=proxy) if proxy else await h.with_service()
    return node


async def assert_rejected(node: Node, request: bytes, status: int = 400) -> dict[str, Any]:
    """Send `request`; expect a JSON error with `status` and the connection closed."""
    conn = await connect(node)
    await conn.send(request)
    resp = await conn.read_response()
    assert resp.status == status, resp
    assert resp.header("content-type") == "application/json"
    assert resp.header("connection") == "close"
    assert await conn.closed_by_peer()
    await conn.close()
    body: dict[str, Any] = json.loads(resp.body)
    return body


async def assert_node_serves(node: Node) -> None:
    conn = await connect(node)
    await conn.send(b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
    resp = await conn.read_response()
    assert (resp.status, resp.body) == (200, b"hello")
    await conn.close()


SMUGGLING = {
    "content-length and transfer-encoding": (
        b"POST /echo HTTP/1.1\r\n" + HOST + b"Content-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "transfer-encoding and content-length": (
        b"POST /echo HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n0\r\n\r\n"
    ),
    "two different content-lengths": (
        b"POST /echo HTTP/1.1\r\n" + HOST + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"
    ),
    "a list of content-lengths": (
        b"POST /echo HTTP/1.1\r\n" + HOST + b"Content-Length: 4, 5\r\n\r\nabcde"
    ),
    "bad chunk size": (
        b"POST /echo HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n"
    ),
    "chunk size overflow": (
        b"POST /echo HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
        b"fffffffffffffffff1\r\nabc\r\n"
    ),
    "transfer-encoding not ending in chunked": (
        b"POST /echo HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked, gzip\r\n\r\nabc"
    ),
    "obs-fold header": (b"GET / HTTP/1.1\r\n" + HOST + b"X-Folded: one\r\n two\r\n\r\n"),
    "space before colon": b"GET / HTTP/1.1\r\n" + HOST + b"X-Bad : value\r\n\r\n",
    "invalid header name character": b"GET / HTTP/1.1\r\n" + HOST + b"X-B(d: value\r\n\r\n",
    "control character in header value": b"GET / HTTP/1.1\r\n" + HOST + b"X-Bad: a\x01b\r\n\r\n",
    "bare LF line ending in chunk": (
        b"POST /echo HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n"
    ),
    "duplicate host": b"GET / HTTP/1.1\r\n" + HOST + HOST + b"\r\n",
    "garbage request line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", SMUGGLING.values(), ids=list(SMUGGLING))
async def test_ambiguous_or_malformed_request_is_rejected_with_400_and_closed(
    h: Harness, request_bytes: bytes
) -> None:
    node = await start(h)
    body = await assert_rejected(node, request_bytes)
    assert isinstance(body["error"], str) and body["error"]
    await assert_node_serves(node)


async def test_smuggled_request_after_bad_chunk_never_reaches_the_service(h: Harness) -> None:
    node = await start(h)
    conn = await connect(node)
    await conn.send(
        b"POST /echo HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\nzz\r\n"
        b"GET /echo?smuggled=1 HTTP/1.1\r\n" + HOST + b"\r\n"
    )
    # The first request may already be on its way (its head was valid); the connection is then
    # dropped, and whatever was sent, no response names the smuggled path.
    data = b""
    while chunk := await conn.reader.read(65536):
        data += chunk
    assert b"smuggled" not in data
    await conn.close()
    await assert_node_serves(node)


async def test_oversized_request_head_gets_431(h: Harness) -> None:
    node = await start(h, max_header_bytes=4096)
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(60))
    body = await assert_rejected(node, b"GET / HTTP/1.1\r\n" + HOST + many + b"\r\n", 431)
    assert body == {"error": "request header fields too large"}
    huge_url = b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n" + HOST + b"\r\n"
    await assert_rejected(node, huge_url, 431)
    await assert_node_serves(node)


async def test_one_endless_header_line_gets_431_without_waiting_for_its_end(h: Harness) -> None:
    node = await start(h, max_header_bytes=4096)
    conn = await connect(node)
    await conn.send(b"GET / HTTP/1.1\r\n" + HOST + b"X-Endless: ")
    await wait_for(
        lambda: any(c._in_head for c in node.connections.snapshot()), what="head started"
    )
    await conn.send(b"v" * 5000)  # never terminated: the node must not buffer it forever
    resp = await conn.read_response()
    assert resp.status == 431
    assert await conn.closed_by_peer()
    await conn.close()


async def test_head_within_the_limit_is_accepted(h: Harness) -> None:
    node = await start(h, max_header_bytes=4096)
    conn = await connect(node)
    # Sent in pieces, as a slow network would deliver it.
    head = b"GET / HTTP/1.1\r\n" + HOST + b"X-Fill: " + b"f" * 3000 + b"\r\n\r\n"
    for i in range(0, len(head), 700):
        await conn.send(head[i : i + 700])
    resp = await conn.read_response()
    assert (resp.status, resp.body) == (200, b"hello")
    await conn.close()


async def test_head_trickling_slower_than_read_header_timeout_gets_408_and_close(
    h: Harness,
) -> None:
    node = await start(h, read_header_timeout="300ms")
    conn = await connect(node)
    await conn.send(b"GET / HTTP/1.1\r\n" + HOST + b"X-Slow: ")
    resp = await conn.read_response(timeout=5)
    assert resp.status == 408
    assert await conn.closed_by_peer()
    await conn.close()
    await assert_node_serves(node)


async def test_connection_that_sends_nothing_is_closed_after_read_header_timeout(
    h: Harness,
) -> None:
    node = await start(h, read_header_timeout="300ms")  # idle_timeout stays 300 s
    conn = await connect(node)
    assert await conn.closed_by_peer(timeout=5)
    await conn.close()


async def test_idle_keep_alive_connection_is_closed_silently_after_idle_timeout(
    h: Harness,
) -> None:
    node = await start(h, idle_timeout="300ms")
    conn = await connect(node)
    await conn.send(b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
    assert (await conn.read_response()).status == 200
    # Closed without an unsolicited response a client could take for its next request's.
    data = await conn.reader.read(65536)
    assert data == b""
    await conn.close()


async def test_slow_exchange_is_not_cut_by_idle_or_header_timeouts(h: Harness) -> None:
    node = await start(h, idle_timeout="300ms", read_header_timeout="300ms")
    conn = await connect(node)
    await conn.send(b"GET /slow?delay=0.8 HTTP/1.1\r\n" + HOST + b"\r\n")
    resp = await conn.read_response()
    assert (resp.status, resp.body) == (200, b"slow")
    await conn.close()


async def test_client_half_closing_after_a_complete_request_still_gets_the_response(
    h: Harness,
) -> None:
    node = await start(h)
    conn = await connect(node)
    await conn.send(b"POST /echo HTTP/1.1\r\n" + HOST + b"Content-Length: 2\r\n\r\nhi")
    conn.writer.write_eof()
    resp = await conn.read_response()
    assert (resp.status, resp.body) == (200, b"hi")
    assert await conn.closed_by_peer()
    await conn.close()


async def test_hop_by_hop_headers_are_not_passed_to_the_service(h: Harness) -> None:
    node = await start(h)
    conn = await connect(node)
    await conn.send(
        b"GET /headers HTTP/1.1\r\n" + HOST + b"Connection: keep-alive, X-Private\r\n"
        b"X-Private: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Connection: keep-alive\r\n"
        b"Upgrade-Insecure-Requests: 1\r\nX-Forwarded-For: 10.0.0.1\r\nX-End: kept\r\n\r\n"
    )
    resp = await conn.read_response()
    seen = json.loads(resp.body)
    for name in ("x-private", "keep-alive", "te", "proxy-authorization", "proxy-connection"):
        assert name not in seen, name
    assert seen["connection"] != "X-Private" if "connection" in seen else True
    assert seen["x-end"] == "kept"
    assert seen["upgrade-insecure-requests"] == "1"
    assert seen["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert seen["host"] == "ep.example.com"
    await conn.close()


async def test_client_keep_alive_survives_response_with_hop_by_hop_headers(h: Harness) -> None:
    node = await start(h)
    conn = await connect(node)
    for _ in range(2):
        await conn.send(b"GET / HTTP/1.1\r\n" + HOST + b"\r\n")
        resp = await conn.read_response()
        assert resp.header("keep-alive") is None
        assert resp.body == b"hello"
    await conn.close()
