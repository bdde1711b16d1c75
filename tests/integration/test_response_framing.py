"""Responses relayed with the framing the node parsed: trailers, codings, HTTP/1.0 clients,
and framing a service states ambiguously."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.support.cluster import Harness, connect
from tests.support.services import RawConnection

REQUEST = b"GET / HTTP/1.1\r\nHost: ep.example.com\r\n\r\n"


async def canned(h: Harness, response: bytes) -> RawConnection:
    """A node whose endpoint `ep` answers every request with `response`; a client of it."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(response)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    h.closers.append(server.close)
    port = server.sockets[0].getsockname()[1]
    node = await h.node()
    await h.agent(node, [f"ep/127.0.0.1:{port}"])
    await h.tunnel_up(node, "ep")
    return await connect(node)


async def read_all(conn: RawConnection) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(conn.reader.read(65536), 10):
            data += chunk
    return data


async def test_response_trailers_reach_the_client_as_trailers(h: Harness) -> None:
    conn = await canned(
        h,
        b"HTTP/1.1 200 OK\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Sum: 42\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
    )
    await conn.send(REQUEST)
    head = await conn.read_head()
    assert head.header("trailer") == "X-Sum"
    assert head.header("transfer-encoding") == "chunked"
    rest = await asyncio.wait_for(conn.reader.readuntil(b"0\r\n"), 10)
    assert rest == b"3\r\nabc\r\n0\r\n"
    trailers = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 10)
    assert trailers == b"X-Sum: 42\r\n\r\n"  # forwarding fields never pass
    await conn.send(REQUEST)  # the connection stays usable
    assert (await conn.read_response()).body == b"abc"
    await conn.close()


async def test_http10_client_gets_the_body_dechunked_without_trailers(h: Harness) -> None:
    conn = await canned(
        h,
        b"HTTP/1.1 200 OK\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Sum: 42\r\n\r\n",
    )
    await conn.send(b"GET / HTTP/1.0\r\nHost: ep.example.com\r\n\r\n")
    data = await read_all(conn)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Trailer" not in head
    assert body == b"abc"
    await conn.close()


async def test_codings_before_chunked_are_kept(h: Harness) -> None:
    conn = await canned(
        h,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    await conn.send(REQUEST)
    resp = await conn.read_response()
    assert resp.header("transfer-encoding") == "gzip, chunked"
    assert resp.body == b"abc"
    await conn.close()


async def test_connection_naming_content_length_in_a_response_keeps_its_framing(
    h: Harness,
) -> None:
    conn = await canned(
        h, b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\nhi"
    )
    for _ in range(2):
        await conn.send(REQUEST)
        resp = await conn.read_response()
        assert (resp.header("content-length"), resp.body) == ("2", b"hi")
    await conn.close()


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nhi",
    ],
    ids=["content-length and transfer-encoding", "transfer-encoding not ending in chunked"],
)
async def test_ambiguous_response_framing_gets_502(h: Harness, response: bytes) -> None:
    conn = await canned(h, response)
    await conn.send(REQUEST)
    resp = await conn.read_response()
    assert resp.status == 502
    assert resp.body == b'{"error":"upstream unreachable"}\n'
    await conn.close()
