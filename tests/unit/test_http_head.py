"""Request routing and head rewriting: pure functions over header lists."""

from __future__ import annotations

import httptools
import orjson
import pytest

from pico.http.framing import CHUNKED, NO_BODY, Body, Framing
from pico.http.head import (
    endpoint_from_host,
    endpoint_id,
    endpoint_key,
    error_response,
    render_trailers,
    rewrite_request_head,
    rewrite_response_head,
    valid_endpoint_id,
)


@pytest.mark.parametrize(
    ("host", "endpoint"),
    [
        ("my-endpoint.example.com:8000", "my-endpoint"),
        ("my-endpoint.example.com", "my-endpoint"),
        ("a.b", "a"),
        (" a.b ", "a"),
        ("localhost:9000", ""),
        ("localhost", ""),
        ("127.0.0.1:8000", ""),
        ("127.0.0.1", ""),
        ("[::1]:80", ""),
        ("[::1]", ""),
        ("::1", ""),
        ("2001:db8::1", ""),
        ("", ""),
    ],
)
def test_endpoint_from_host_is_the_first_label_of_a_dotted_name(host: str, endpoint: str) -> None:
    assert endpoint_from_host(host.encode()) == endpoint


def test_endpoint_header_wins_over_host() -> None:
    assert endpoint_id(b"from-header", b"from-host.example.com") == "from-header"
    assert endpoint_id(None, b"from-host.example.com") == "from-host"
    assert endpoint_id(b"", b"from-host.example.com") == "from-host"
    assert endpoint_id(None, None) == ""


@pytest.mark.parametrize("name", ["a", "my-endpoint", "A.b_c-9", "x" * 128])
def test_valid_endpoint_ids(name: str) -> None:
    assert valid_endpoint_id(name)


@pytest.mark.parametrize("name", ["", "x" * 129, "bad!id", "a/b", "a b", "é"])
def test_invalid_endpoint_ids(name: str) -> None:
    assert not valid_endpoint_id(name)


def _parse_request(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Parse a head with httptools, as the service would."""
    seen: list[tuple[bytes, bytes]] = []
    url = bytearray()

    class Callbacks:
        def on_url(self, part: bytes) -> None:
            url.extend(part)

        def on_header(self, name: bytes, value: bytes) -> None:
            seen.append((name, value))

    httptools.HttpRequestParser(Callbacks()).feed_data(head)
    return bytes(url), seen


def _names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [name.lower() for name, _ in headers]


def test_rewrite_request_head_drops_hop_by_hop_and_connection_listed_headers() -> None:
    headers = [
        (b"Host", b"ep.example.com"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"X-Secret", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-T"),
        (b"Proxy-Authorization", b"Basic Zm9v"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"X-Kept", b"yes"),
    ]
    head = rewrite_request_head(
        b"GET",
        b"/path?q=1",
        headers,
        client_ip="10.1.2.3",
        framing=NO_BODY,
        upgrade=None,
        forwarded=False,
        forward_mark=None,
    )
    assert head.startswith(b"GET /path?q=1 HTTP/1.1\r\n")
    assert head.endswith(b"\r\n\r\n")
    _, seen = _parse_request(head)
    assert _names(seen) == [
        b"host",
        b"x-kept",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    ]
    assert dict(seen)[b"X-Forwarded-For"] == b"10.1.2.3"
    assert dict(seen)[b"X-Forwarded-Host"] == b"ep.example.com"


def test_rewrite_request_head_appends_to_x_forwarded_for_and_keeps_a_trusted_proxys() -> None:
    headers = [
        (b"Host", b"ep.example.com"),
        (b"X-Forwarded-For", b"1.1.1.1"),
        (b"x-forwarded-for", b"2.2.2.2"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"public.example.com"),
    ]
    head = rewrite_request_head(
        b"POST",
        b"/",
        headers,
        client_ip="3.3.3.3",
        framing=CHUNKED,
        upgrade=None,
        forwarded=False,
        forward_mark=b"true",
        trusted_client=True,
    )
    _, seen = _parse_request(head + b"0\r\n\r\n")
    values = dict((n.lower(), v) for n, v in seen)
    assert values[b"x-forwarded-for"] == b"1.1.1.1, 2.2.2.2, 3.3.3.3"
    assert values[b"x-forwarded-proto"] == b"https"
    assert values[b"x-forwarded-host"] == b"public.example.com"
    assert values[b"transfer-encoding"] == b"chunked"
    assert values[b"x-pico-forward"] == b"true"
    assert _names(seen).count(b"x-forwarded-for") == 1


def test_rewrite_request_head_passes_a_forwarded_request_unchanged() -> None:
    headers = [
        (b"Host", b"ep.example.com"),
        (b"X-Forwarded-For", b"9.9.9.9"),
        (b"x-pico-forward", b"true"),
    ]
    head = rewrite_request_head(
        b"GET",
        b"/",
        headers,
        client_ip="10.0.0.2",
        framing=NO_BODY,
        upgrade=None,
        forwarded=True,
        forward_mark=None,
    )
    _, seen = _parse_request(head)
    assert seen == [(b"Host", b"ep.example.com"), (b"X-Forwarded-For", b"9.9.9.9")]


def test_rewrite_request_head_restates_an_upgrade() -> None:
    headers = [(b"Host", b"h.example.com"), (b"Connection", b"Upgrade"), (b"Upgrade", b"x")]
    head = rewrite_request_head(
        b"GET",
        b"/ws",
        headers,
        client_ip="1.2.3.4",
        framing=NO_BODY,
        upgrade=b"websocket",
        forwarded=False,
        forward_mark=None,
    )
    assert b"Connection: Upgrade\r\nUpgrade: websocket\r\n" in head
    assert head.count(b"Upgrade:") == 1


def test_rewrite_response_head_drops_hop_by_hop_and_sets_framing() -> None:
    headers = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
    ]
    head = rewrite_response_head(
        200, b"OK", headers, framing=CHUNKED, chunked=True, close=True, upgrade=False
    )
    assert head == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n"
    )
    head = rewrite_response_head(
        204, b"", [], framing=NO_BODY, chunked=False, close=False, upgrade=False
    )
    assert head == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_rewrite_response_head_keeps_the_upgrade_of_a_101() -> None:
    headers = [(b"Upgrade", b"websocket"), (b"Connection", b"upgrade"), (b"Sec-X", b"k")]
    head = rewrite_response_head(
        101, b"", headers, framing=NO_BODY, chunked=False, close=True, upgrade=True
    )
    assert head == (
        b"HTTP/1.1 101 Switching Protocols\r\nSec-X: k\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )


def test_error_response_is_json_with_length() -> None:
    data = error_response(502, "upstream unreachable", close=True)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"Content-Type: application/json" in head
    assert b"Connection: close" in head
    assert b"Content-Length: %d" % len(body) in head
    assert orjson.loads(body) == {"error": "upstream unreachable"}
    assert b"Connection" not in error_response(400, "x", close=False)


def test_connection_tokens_cannot_remove_the_framing_the_node_writes() -> None:
    """`Connection: content-length` once dropped the length while its body was relayed."""
    headers = [
        (b"Host", b"ep.example.com"),
        (b"Connection", b"content-length, transfer-encoding, host, X-Gone"),
        (b"Content-Length", b"39"),
        (b"X-Gone", b"1"),
    ]
    head = rewrite_request_head(
        b"POST",
        b"/",
        headers,
        client_ip="1.2.3.4",
        framing=Framing(Body.LENGTH, 39),
        upgrade=None,
        forwarded=False,
        forward_mark=None,
    )
    _, seen = _parse_request(head)
    values = {n.lower(): v for n, v in seen}
    assert values[b"content-length"] == b"39"
    assert values[b"host"] == b"ep.example.com"
    assert b"x-gone" not in values
    assert _names(seen).count(b"content-length") == 1


def test_client_framing_headers_are_replaced_by_the_parsed_framing() -> None:
    headers = [(b"Host", b"h.example.com"), (b"Content-Length", b"5"), (b"Trailer", b"X-T")]
    chunked = rewrite_request_head(
        b"POST",
        b"/",
        headers,
        client_ip="1.2.3.4",
        framing=CHUNKED,
        upgrade=None,
        forwarded=False,
        forward_mark=None,
    )
    assert b"Content-Length" not in chunked
    assert b"Transfer-Encoding: chunked\r\n" in chunked
    assert b"Trailer: X-T\r\n" in chunked  # announced trailers go on with a chunked body
    plain = rewrite_request_head(
        b"GET",
        b"/",
        headers,
        client_ip="1.2.3.4",
        framing=NO_BODY,
        upgrade=None,
        forwarded=False,
        forward_mark=None,
    )
    assert b"Content-Length" not in plain and b"Trailer" not in plain


def test_response_codings_before_chunked_are_kept_and_trailer_goes_with_chunked_only() -> None:
    headers = [(b"Transfer-Encoding", b"gzip, chunked"), (b"Trailer", b"X-Sum")]
    framing = Framing(Body.CHUNKED, codings=b"gzip")
    head = rewrite_response_head(
        200, b"OK", headers, framing=framing, chunked=True, close=False, upgrade=False
    )
    assert b"Transfer-Encoding: gzip, chunked\r\n" in head
    assert b"Trailer: X-Sum\r\n" in head
    dechunked = rewrite_response_head(
        200, b"OK", headers, framing=CHUNKED, chunked=False, close=True, upgrade=False
    )
    assert b"Transfer-Encoding" not in dechunked and b"Trailer" not in dechunked


def test_response_length_is_written_from_the_framing_not_the_header_text() -> None:
    headers = [(b"Connection", b"content-length"), (b"Content-Length", b"5")]
    head = rewrite_response_head(
        200,
        b"OK",
        headers,
        framing=Framing(Body.LENGTH, 5),
        chunked=False,
        close=False,
        upgrade=False,
    )
    assert head == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    stated = Framing(Body.NONE, stated_length=b"99")
    head = rewrite_response_head(
        200, b"OK", headers, framing=stated, chunked=False, close=False, upgrade=False
    )
    assert head == b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"


def test_trailers_drop_routing_framing_and_forwarding_fields() -> None:
    trailers = [
        (b"Host", b"evil.example.com"),
        (b"Content-Length", b"5"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"Transfer-Encoding", b"chunked"),
        (b"x-pico-endpoint", b"other"),
        (b"x-pico-authorization", b"Bearer t"),
        (b"X-Checksum", b"abc"),
    ]
    assert render_trailers(trailers) == b"0\r\nX-Checksum: abc\r\n\r\n"
    assert render_trailers([]) == b"0\r\n\r\n"


def test_endpoint_ids_fold_ascii_case() -> None:
    assert endpoint_id(None, b"WEB.Example.COM") == "web"
    assert endpoint_id(b"My-App", None) == "my-app"
    assert endpoint_key("My-App") == "my-app"


def test_forwarding_headers_of_an_untrusted_client_are_replaced() -> None:
    headers = [
        (b"Host", b"ep.example.com"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"bank.example.com"),
    ]
    head = rewrite_request_head(
        b"GET",
        b"/",
        headers,
        client_ip="6.6.6.6",
        framing=NO_BODY,
        upgrade=None,
        forwarded=False,
        forward_mark=None,
    )
    _, seen = _parse_request(head)
    values = {n.lower(): v for n, v in seen}
    assert values[b"x-forwarded-proto"] == b"http"
    assert values[b"x-forwarded-host"] == b"ep.example.com"
    assert _names(seen).count(b"x-forwarded-proto") == 1
