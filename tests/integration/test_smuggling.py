"""Request smuggling regression suite: what reaches the service, byte for byte.

Every vector is sent as raw bytes through the node that holds the tunnel (`direct`) and through a
second node that forwards to it (`forwarded`). The service is a recorder that parses with h11, a
different parser from the node's, so a message two parsers read differently shows up as a
different request at the service. Each test asserts what the client got, exactly what the
service received, and then sends a victim request on a new connection that must arrive alone and
intact and get its own answer.

The node writes its own framing header from what it parsed: whatever `Connection` names, the
service sees the length the node used. Requests it refuses (ambiguous framing, malformed heads,
CONNECT, an Upgrade with a body) get a JSON error and nothing of them reaches the service. For
vectors whose head is valid and whose chunked body is malformed, the head may already be on its
way (bodies stream); then the service sees that head and no complete request, and nothing that
followed the bad chunk.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from pico.server.node import Node
from tests.support.cluster import Harness, connect
from tests.support.recorder import (
    RecordedRequest,
    Recorder,
    assert_victim_intact,
    serve_through_pico,
    start_recorder,
)
from tests.support.services import RawConnection, RawResponse

HOST = b"Host: ep.example.com\r\n"
# A complete request hidden in a body: it must never reach the service as a request.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: ep.ex\r\n\r\n"
assert len(SMUGGLED) == 39


@dataclass
class Route:
    """Where a test's client connects, and the recorder behind the endpoint `ep`."""

    entry: Node
    recorder: Recorder


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = await start_recorder()
    try:
        yield rec
    finally:
        await rec.close()


@pytest.fixture(params=["direct", "forwarded"])
async def route(request: pytest.FixtureRequest, h: Harness, recorder: Recorder) -> Route:
    entry = await serve_through_pico(h, recorder, forwarded=request.param == "forwarded")
    return Route(entry, recorder)


async def send(route: Route, data: bytes) -> tuple[RawConnection, RawResponse]:
    """Send `data` on a new connection; return it and the first response."""
    conn = await connect(route.entry)
    await conn.send(data)
    return conn, await conn.read_response()


def assert_json_error(resp: RawResponse, status: int, message: str | None = None) -> str:
    """A Pico error: `status`, JSON `{"error": message}` (any message if None)."""
    assert resp.status == status, (resp.status, resp.body)
    assert resp.header("content-type") == "application/json", resp.headers
    body: dict[str, Any] = json.loads(resp.body)
    assert list(body) == ["error"], body
    assert isinstance(body["error"], str) and body["error"]
    if message is not None:
        assert body["error"] == message
    return body["error"]


async def assert_closed(conn: RawConnection, resp: RawResponse) -> None:
    assert resp.header("connection") == "close", resp.headers
    assert await conn.closed_by_peer()


def no_request_smuggled(rec: Recorder) -> None:
    smuggled = [r for r in rec.requests if b"smuggled" in r.target]
    assert smuggled == [], smuggled


async def only_the_victim_reached_the_service(rec: Recorder, victim: RecordedRequest) -> None:
    """Not a byte of the attack reached the service: it saw the victim's bytes and nothing else."""
    await rec.wait_settled()
    assert rec.requests == [victim], rec.requests
    received = [data for data in rec.raw.values() if data]
    assert received == [rec.raw[victim.connection]], rec.raw
    assert received[0].startswith(b"GET /victim "), received


def framing(req: RecordedRequest) -> dict[str, list[bytes]]:
    return {
        "content-length": req.values(b"content-length"),
        "transfer-encoding": req.values(b"transfer-encoding"),
    }


# -- Connection naming the framing headers ---------------------------------------------------


@pytest.mark.parametrize("connection", [b"content-length", b"Content-Length, close"])
async def test_connection_naming_content_length_cannot_desync_the_stream(
    route: Route, connection: bytes
) -> None:
    rec = route.recorder
    conn, resp = await send(
        route,
        b"POST /upload HTTP/1.1\r\n" + HOST + b"Connection: " + connection + b"\r\n"
        b"Content-Length: 39\r\n\r\n" + SMUGGLED,
    )
    assert resp.status == 200, (resp.status, resp.body)
    if b"close" in connection:
        await assert_closed(conn, resp)
    await conn.close()
    await rec.wait_requests(1)
    await rec.wait_settled()
    no_request_smuggled(rec)
    assert [(r.method, r.target) for r in rec.requests] == [(b"POST", b"/upload")]
    post = rec.requests[0]
    assert framing(post) == {"content-length": [b"39"], "transfer-encoding": []}
    assert post.complete and bytes(post.body) == SMUGGLED
    assert resp.body == b"ok %d" % post.number
    await assert_victim_intact(route.entry, rec)


async def test_connection_naming_transfer_encoding_keeps_the_request_chunked(
    route: Route,
) -> None:
    rec = route.recorder
    conn, resp = await send(
        route,
        b"POST /upload HTTP/1.1\r\n" + HOST + b"Connection: transfer-encoding\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n27\r\n" + SMUGGLED + b"\r\n0\r\n\r\n",
    )
    assert resp.status == 200, (resp.status, resp.body)
    await conn.close()
    await rec.wait_requests(1)
    await rec.wait_settled()
    no_request_smuggled(rec)
    assert [(r.method, r.target) for r in rec.requests] == [(b"POST", b"/upload")]
    post = rec.requests[0]
    assert framing(post) == {"content-length": [], "transfer-encoding": [b"chunked"]}
    assert post.complete and bytes(post.body) == SMUGGLED
    assert resp.body == b"ok %d" % post.number
    await assert_victim_intact(route.entry, rec)


# -- a service that answers before the body ends ---------------------------------------------


async def test_upgrade_request_with_a_body_is_refused_before_reaching_the_service(
    route: Route,
) -> None:
    rec = route.recorder
    body = (SMUGGLED * 11)[:400]
    conn, resp = await send(
        route,
        b"POST /early-401 HTTP/1.1\r\n" + HOST + b"Connection: Upgrade\r\nUpgrade: h2c\r\n"
        b"Content-Length: 400\r\n\r\n" + body,
    )
    assert_json_error(resp, 400, "Upgrade request with a body")
    await assert_closed(conn, resp)
    await conn.close()
    victim = await assert_victim_intact(route.entry, rec)
    await only_the_victim_reached_the_service(rec, victim)


async def test_service_answering_before_the_body_ends_leaves_no_half_used_stream(
    route: Route,
) -> None:
    rec = route.recorder
    sent = b"x" * 100  # of the 400 announced
    conn, resp = await send(
        route,
        b"POST /early-401 HTTP/1.1\r\n" + HOST + b"Content-Length: 400\r\n\r\n" + sent,
    )
    assert resp.status == 401, (resp.status, resp.body)
    # Recorded before it was answered; its body never completes.
    assert len(rec.requests) == 1
    early = rec.requests[0]
    assert (early.method, early.target) == (b"POST", b"/early-401")
    assert framing(early) == {"content-length": [b"400"], "transfer-encoding": []}
    assert resp.body == b"ok %d" % early.number
    # The victim goes while this client still holds its connection: a stream the node kept
    # for reuse would carry the victim into the 300 body bytes the service still expects.
    await assert_victim_intact(route.entry, rec)
    await conn.close()
    await rec.wait_settled()
    assert not early.complete and sent.startswith(bytes(early.body))
    assert len(rec.requests) == 2


# -- trailers ---------------------------------------------------------------------------------


TRAILERS = {
    "host, x-forwarded-for": b"Host: evil.example.com\r\nX-Forwarded-For: 6.6.6.6\r\n",
    "x-pico-endpoint, x-forwarded-host": (
        b"x-pico-endpoint: other\r\nX-Forwarded-Host: evil.example.com\r\n"
    ),
}


async def test_a_content_length_trailer_is_refused_and_the_request_never_completes(
    route: Route,
) -> None:
    """llhttp refuses framing fields in trailers as it does in a head: 400, and the service,
    which already has the head and the body so far, never sees the request end."""
    rec = route.recorder
    conn, resp = await send(
        route,
        b"POST /trailers HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n" + SMUGGLED,
    )
    assert_json_error(resp, 400)
    await assert_closed(conn, resp)
    await conn.close()
    await rec.wait_settled()
    assert not any(r.complete for r in rec.requests), rec.requests
    assert not any(r.target == b"/smuggled" for r in rec.requests)
    await assert_victim_intact(route.entry, rec)


@pytest.mark.parametrize("trailers", TRAILERS.values(), ids=list(TRAILERS))
async def test_trailers_never_become_request_headers(route: Route, trailers: bytes) -> None:
    rec = route.recorder
    conn, resp = await send(
        route,
        b"POST /trailers HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n"
        b"Trailer: X-Trailer-Ok\r\n\r\n"
        b"5\r\nhello\r\n0\r\n" + trailers + b"X-Trailer-Ok: yes\r\n\r\n",
    )
    assert resp.status == 200, (resp.status, resp.body)
    await conn.close()
    await rec.wait_requests(1)
    await rec.wait_settled()
    assert len(rec.requests) == 1
    req = rec.requests[0]
    assert req.complete and bytes(req.body) == b"hello"
    assert resp.body == b"ok %d" % req.number
    assert req.values(b"host") == [b"ep.example.com"]
    assert req.values(b"content-length") == []
    assert req.values(b"transfer-encoding") == [b"chunked"]
    assert req.values(b"x-forwarded-for") == [b"127.0.0.1"]
    assert req.values(b"trailer") == [b"X-Trailer-Ok"]
    assert not any(b"6.6.6.6" in v or b"evil" in v for _, v in req.headers), req.headers
    assert req.values(b"x-pico-endpoint") == []
    assert (b"x-trailer-ok", b"yes") in req.trailers
    forbidden_fields = (b"host", b"x-forwarded-for", b"x-pico-endpoint", b"x-forwarded-host")
    for forbidden in forbidden_fields:
        assert req.trailer_values(forbidden) == [], req.trailers
    await assert_victim_intact(route.entry, rec)


# -- methods and codings the node does not carry -------------------------------------------


async def test_connect_is_refused_with_405_and_allow(route: Route) -> None:
    rec = route.recorder
    conn, resp = await send(
        route,
        b"CONNECT a.example.com:443 HTTP/1.1\r\n" + HOST + b"x-pico-endpoint: ep\r\n\r\n",
    )
    assert_json_error(resp, 405)
    allow = resp.header("allow")
    assert allow, resp.headers
    assert "CONNECT" not in allow.upper()
    await conn.close()
    victim = await assert_victim_intact(route.entry, rec)
    await only_the_victim_reached_the_service(rec, victim)


async def test_transfer_coding_other_than_chunked_gets_501(route: Route) -> None:
    rec = route.recorder
    conn, resp = await send(
        route,
        b"POST /gzip HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
    )
    assert_json_error(resp, 501, "unsupported transfer coding")
    await assert_closed(conn, resp)
    await conn.close()
    victim = await assert_victim_intact(route.entry, rec)
    await only_the_victim_reached_the_service(rec, victim)


# -- Host -------------------------------------------------------------------------------------


async def test_http10_request_without_host_gets_the_endpoint_as_host(route: Route) -> None:
    rec = route.recorder
    conn, resp = await send(route, b"GET /old HTTP/1.0\r\nx-pico-endpoint: ep\r\n\r\n")
    assert resp.status == 200, (resp.status, resp.body)
    await conn.close()
    await rec.wait_requests(1)
    await rec.wait_settled()
    assert [(r.method, r.target) for r in rec.requests] == [(b"GET", b"/old")]
    assert rec.requests[0].values(b"host") == [b"ep"]
    assert resp.body == b"ok %d" % rec.requests[0].number
    await assert_victim_intact(route.entry, rec)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /old HTTP/1.0\r\n\r\n",
        b"GET /new HTTP/1.1\r\n\r\n",
        b"GET /new HTTP/1.1\r\nx-pico-endpoint: ep\r\n\r\n",
    ],
    ids=["http10-no-endpoint", "http11", "http11-with-endpoint-header"],
)
async def test_request_without_host_gets_400_missing_host(
    route: Route, request_bytes: bytes
) -> None:
    rec = route.recorder
    conn, resp = await send(route, request_bytes)
    assert_json_error(resp, 400, "missing Host")
    await conn.close()
    victim = await assert_victim_intact(route.entry, rec)
    await only_the_victim_reached_the_service(rec, victim)


async def test_host_names_the_endpoint_in_any_case(route: Route) -> None:
    rec = route.recorder
    conn, resp = await send(route, b"GET /case HTTP/1.1\r\nHost: EP.Example.COM\r\n\r\n")
    assert resp.status == 200, (resp.status, resp.body)
    await conn.close()
    await rec.wait_requests(1)
    assert [(r.method, r.target) for r in rec.requests] == [(b"GET", b"/case")]
    hosts = rec.requests[0].values(b"host")
    assert [v.lower() for v in hosts] == [b"ep.example.com"]
    assert resp.body == b"ok %d" % rec.requests[0].number
    await assert_victim_intact(route.entry, rec)


async def test_absolute_form_target_authority_wins_over_host(route: Route) -> None:
    rec = route.recorder
    conn, resp = await send(
        route, b"GET http://ep.example.com/x HTTP/1.1\r\nHost: other.example.com\r\n\r\n"
    )
    assert resp.status == 200, (resp.status, resp.body)
    await conn.close()
    await rec.wait_requests(1)
    assert [(r.method, r.target) for r in rec.requests] == [(b"GET", b"/x")]
    assert rec.requests[0].values(b"host") == [b"ep.example.com"]
    assert resp.body == b"ok %d" % rec.requests[0].number
    await assert_victim_intact(route.entry, rec)


# -- classic vectors ---------------------------------------------------------------------------


def post(headers: bytes, body: bytes, *, version: bytes = b"1.1") -> bytes:
    return b"POST /attack HTTP/" + version + b"\r\n" + HOST + headers + b"\r\n" + body


CHUNKED_SMUGGLED = b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"

# Refused on the head: not a byte of them may reach the service.
REFUSED_HEADS = {
    "CL.TE": post(b"Content-Length: 6\r\n" + CHUNKED, b"0\r\n\r\n" + SMUGGLED),
    "TE.CL": post(CHUNKED + b"Content-Length: 4\r\n", CHUNKED_SMUGGLED),
    "xchunked": post(b"Transfer-Encoding: xchunked\r\n", CHUNKED_SMUGGLED),
    "space before colon": post(b"Transfer-Encoding : chunked\r\n", CHUNKED_SMUGGLED),
    "vertical tab before value": post(b"Transfer-Encoding: \x0bchunked\r\n", CHUNKED_SMUGGLED),
    "obs-fold": post(b"Transfer-Encoding: identity\r\n chunked\r\n", CHUNKED_SMUGGLED),
    "duplicate transfer-encoding": post(CHUNKED + CHUNKED, CHUNKED_SMUGGLED),
    "chunked then identity": post(b"Transfer-Encoding: chunked, identity\r\n", CHUNKED_SMUGGLED),
    "bare LF line endings in the head": (
        b"POST /attack HTTP/1.1\nHost: ep.example.com\nContent-Length: 39\n\n" + SMUGGLED
    ),
    "a bare LF in a CRLF head": (
        b"POST /attack HTTP/1.1\r\nHost: ep.example.com\nContent-Length: 39\r\n\r\n" + SMUGGLED
    ),
    "NUL in a header value": post(b"X-Nul: a\x00b\r\nContent-Length: 39\r\n", SMUGGLED),
    "bare CR in a header value": post(b"X-Cr: a\rb\r\nContent-Length: 39\r\n", SMUGGLED),
    "content-length with a sign": post(b"Content-Length: +39\r\n", SMUGGLED),
    "content-length list": post(b"Content-Length: 3, 39\r\n", SMUGGLED),
    "duplicate differing content-length": post(
        b"Content-Length: 3\r\nContent-Length: 39\r\n", SMUGGLED
    ),
    "duplicate host": post(HOST + b"Content-Length: 39\r\n", SMUGGLED),
    "chunked in HTTP/1.0": post(CHUNKED, CHUNKED_SMUGGLED, version=b"1.0"),
}

# Valid heads with a malformed chunked body, followed by a request that must not get through.
BAD_CHUNKS = {
    "bare LF in a chunk": post(CHUNKED, b"3\nabc\r\n0\r\n\r\n" + SMUGGLED),
    "chunk size overflow": post(CHUNKED, b"fffffffffffffffff1\r\nabc\r\n0\r\n\r\n" + SMUGGLED),
    "0x chunk size": post(CHUNKED, b"0x3\r\nabc\r\n0\r\n\r\n" + SMUGGLED),
}


async def reject(route: Route, request_bytes: bytes) -> None:
    """Send `request_bytes`; expect a 400 JSON error and the connection closed."""
    conn, resp = await send(route, request_bytes)
    assert_json_error(resp, 400)
    await assert_closed(conn, resp)
    await conn.close()


@pytest.mark.parametrize("request_bytes", REFUSED_HEADS.values(), ids=list(REFUSED_HEADS))
async def test_ambiguous_or_malformed_head_is_refused_and_reaches_nothing(
    route: Route, request_bytes: bytes
) -> None:
    await reject(route, request_bytes)
    victim = await assert_victim_intact(route.entry, route.recorder)
    await only_the_victim_reached_the_service(route.recorder, victim)


@pytest.mark.parametrize("request_bytes", BAD_CHUNKS.values(), ids=list(BAD_CHUNKS))
async def test_malformed_chunk_is_refused_and_completes_no_request(
    route: Route, request_bytes: bytes
) -> None:
    rec = route.recorder
    await reject(route, request_bytes)
    victim = await assert_victim_intact(route.entry, rec)
    await rec.wait_settled()
    no_request_smuggled(rec)
    others = [r for r in rec.requests if r is not victim]
    # The head may have streamed ahead of its body; no byte after the bad chunk may follow.
    assert [(r.target, r.complete, bytes(r.body)) for r in others] in (
        [],
        [(b"/attack", False, b"")],
    ), others
    assert not any(b"smuggled" in data for data in rec.raw.values())


async def test_tab_before_transfer_encoding_value_is_whitespace(route: Route) -> None:
    rec = route.recorder
    conn, resp = await send(
        route, post(b"Transfer-Encoding:\tchunked\r\n", b"5\r\nhello\r\n0\r\n\r\n")
    )
    assert resp.status == 200, (resp.status, resp.body)
    await conn.close()
    await rec.wait_requests(1)
    assert [(r.method, r.target) for r in rec.requests] == [(b"POST", b"/attack")]
    req = rec.requests[0]
    assert framing(req) == {"content-length": [], "transfer-encoding": [b"chunked"]}
    assert req.complete and bytes(req.body) == b"hello"
    assert resp.body == b"ok %d" % req.number
    await assert_victim_intact(route.entry, rec)


# -- limits along the way ----------------------------------------------------------------------


@pytest.mark.parametrize("forwarded", [False, True], ids=["direct", "forwarded"])
async def test_head_accepted_at_the_edge_is_accepted_by_the_node_it_is_forwarded_to(
    h: Harness, recorder: Recorder, forwarded: bool
) -> None:
    entry = await serve_through_pico(
        h, recorder, forwarded=forwarded, proxy={"max_header_bytes": 4096}
    )
    # A long Host (copied into X-Forwarded-Host on the way) and filler: about 4000 bytes, under
    # the edge's limit, but more than it once the first node adds its X-Forwarded-* headers.
    long_host = b"ep." + b".".join([b"a" * 62] * 24) + b".example.com"
    head = b"GET /big HTTP/1.1\r\nHost: " + long_host + b"\r\nX-Fill: "
    head += b"f" * (4000 - len(head) - 4) + b"\r\n\r\n"
    assert 3990 <= len(head) <= 4000
    route = Route(entry, recorder)
    conn, resp = await send(route, head)
    assert resp.status == 200, (resp.status, resp.body)
    await conn.close()
    await recorder.wait_requests(1)
    req = recorder.requests[0]
    assert (req.method, req.target) == (b"GET", b"/big")
    assert req.values(b"host") == [long_host]
    assert req.values(b"x-fill") == [head.split(b"X-Fill: ")[1][:-4]]
    assert resp.body == b"ok %d" % req.number
    await assert_victim_intact(entry, recorder)
