"""The SDK's bound on request heads: what a node (or anything posing as one) may make an app's
process hold before a request starts, and that heads a node forwards are served."""

from __future__ import annotations

from typing import Any, cast

import pytest

from pico.agent.inprocess import StreamTransport
from pico.mux.stream import MuxStream
from pico.sdk.asgi import AsgiService
from tests.support.cluster import wait_for
from tests.unit.test_stream_transport import FakeStream


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


def serve(http: str, limits: list[str], app: Any = ok_app) -> tuple[StreamTransport, FakeStream]:
    service = AsgiService(app, http=http, lifespan="off")
    service.report_limits(limits.append)
    stream = FakeStream()
    transport = StreamTransport(cast(MuxStream, stream), service.protocol_factory(), lambda: None)
    transport.start()
    return transport, stream


def written(stream: FakeStream) -> bytes:
    return b"".join(c[1] for c in stream.calls if isinstance(c, tuple) and c[0] == "write")


async def test_a_head_that_never_ends_gets_431_and_the_stream_is_closed() -> None:
    limits: list[str] = []
    transport, stream = serve("httptools", limits)
    transport.data_received(b"GET / HTTP/1.1\r\nhost: x\r\nx-endless: ")
    for _ in range(64):  # up to 4 MiB of one header value: httptools would keep it all
        if transport.is_closing():
            break
        transport.data_received(b"a" * 65536)
    assert transport.is_closing()
    assert written(stream).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert written(stream).endswith(b'\r\n\r\n{"error":"request header fields too large"}')
    assert limits == ["max_header_bytes"]


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_a_head_as_large_as_a_node_forwards_is_served(http: str) -> None:
    limits: list[str] = []
    transport, stream = serve(http, limits)
    cookie = b"c" * (60 * 1024)  # within the node's default proxy.max_header_bytes (64 KiB)
    head = b"GET / HTTP/1.1\r\nhost: x\r\ncookie: " + cookie + b"\r\n\r\n"
    for at in range(0, len(head), 4096):  # in pieces, as the node's reads of it come
        transport.data_received(head[at : at + 4096])
    await wait_for(lambda: written(stream).endswith(b"ok"), what="the response")
    assert written(stream).startswith(b"HTTP/1.1 200 ")
    assert limits == []


async def drain_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole request body, then answers."""
    while (await receive()).get("more_body", False):
        pass
    await ok_app(scope, receive, send)


async def test_trailers_that_never_end_are_bounded_like_a_head() -> None:
    # Trailer fields come after a chunked body, through the same parser: httptools keeps
    # them (and a field that never ends) whole, so they count against max_header_bytes too.
    limits: list[str] = []
    transport, _ = serve("httptools", limits, drain_app)
    transport.data_received(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
    transport.data_received(b"5\r\nhello\r\n0\r\nx-endless: ")
    for _ in range(64):  # up to 4 MiB of one trailer value
        if transport.is_closing():
            break
        transport.data_received(b"a" * 65536)
    assert transport.is_closing()
    assert limits == ["max_header_bytes"]


async def test_a_long_chunked_upload_of_small_chunks_is_not_taken_for_trailers() -> None:
    limits: list[str] = []
    transport, stream = serve("httptools", limits, drain_app)
    transport.data_received(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
    chunk = b"1\r\na\r\n"  # framing is 5 of every 6 bytes: 1 MiB of it, far over the bound
    for _ in range(16):
        transport.data_received(chunk * (65536 // len(chunk)))
    transport.data_received(b"0\r\nx-checksum: 1\r\n\r\n")
    await wait_for(lambda: written(stream).endswith(b"ok"), what="the response")
    assert limits == []
