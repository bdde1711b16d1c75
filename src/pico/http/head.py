"""HTTP/1.1 message heads: endpoint routing, hop-by-hop rewriting, and error responses.

Pure functions over header lists (`list[tuple[bytes, bytes]]`, names as received); no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from http import HTTPStatus

import orjson

from pico.http.framing import BODY_CHUNKED, BODY_LENGTH, Framing

ENDPOINT_HEADER = b"x-pico-endpoint"
FORWARD_HEADER = b"x-pico-forward"
# On an error from a node to the node that forwarded the request: no service saw it.
UNDELIVERED_HEADER = b"x-pico-undelivered"

_ENDPOINT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

# Headers that describe one hop and must not be passed on (RFC 9110 §7.6.1, plus the
# de-facto ones Go's ReverseProxy also drops). Names listed in Connection are dropped too.
# `Trailer` is not among them: it is relayed whenever the body goes on chunked (with its
# trailers), and dropped where the node de-chunks it.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Never relayed as received: the node writes its own framing, from what the parser parsed.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_DROP = HOP_BY_HOP | _FRAMING
# Where the body is not relayed chunked, the `Trailer` header announces nothing.
_DROP_UNCHUNKED = _DROP | {b"trailer"}
# "Not delivered" is said by a node (`error_response`), never by a service: a service that
# sent it could make the node that forwarded its request send it again elsewhere.
_RESPONSE_DROP = _DROP | {UNDELIVERED_HEADER}
_RESPONSE_DROP_UNCHUNKED = _DROP_UNCHUNKED | {UNDELIVERED_HEADER}
# A Connection token cannot remove these: routing must not depend on what survived filtering
# (a forwarded request is routed again by the node that receives it).
_PROTECTED = frozenset({b"host", ENDPOINT_HEADER})
# Trailer fields that could change routing, framing or what the node asserts about the client
# if a service merged them into the header section: dropped (RFC 9110 §6.5.1).
_TRAILER_DROP = _DROP | {
    b"host",
    b"trailer",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-pico-endpoint",
    b"x-pico-forward",
    b"x-pico-undelivered",
    b"x-pico-authorization",
}

Headers = list[tuple[bytes, bytes]]


def valid_endpoint_id(endpoint_id: str) -> bool:
    """True for 1-128 characters of [A-Za-z0-9._-]."""
    return _ENDPOINT_ID.fullmatch(endpoint_id) is not None


def endpoint_from_host(host: bytes) -> str:
    """The endpoint a Host header names: its first label, if it has a dot and is not an IP."""
    text = host.decode("latin-1").strip()
    if not text:
        return ""
    if text.startswith("["):  # [v6]:port
        return ""
    name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    if ":" in name:  # a bare IPv6 address
        return ""
    try:
        ipaddress.ip_address(name)
        return ""
    except ValueError:
        pass
    if "." not in name:
        return ""
    return name.split(".", 1)[0]


def endpoint_id(endpoint_header: bytes | None, host: bytes | None) -> str:
    """The endpoint a request names: `x-pico-endpoint` wins, else the Host's first label.

    ASCII case is folded (hostnames are case-insensitive, RFC 9110 §4.2.3): ids that differ
    only in case name the same endpoint.
    """
    if endpoint_header:
        return endpoint_header.strip().lower().decode("latin-1")
    if host:
        return endpoint_from_host(host.lower())
    return ""


def endpoint_key(endpoint_id: str) -> str:
    """The routing key of an endpoint id as registered: its ASCII case folded."""
    return endpoint_id.lower()


_COMMON_CONNECTION_VALUES = frozenset({b"keep-alive", b"close", b"upgrade", b"Keep-Alive"})


def _drop_set(headers: Headers, base: frozenset[bytes] = _DROP) -> frozenset[bytes]:
    """Header names not to pass on: `base` plus any unusual Connection tokens."""
    extra: set[bytes] | None = None
    for name, value in headers:
        # Length first (this runs twice per request over every header); the usual values
        # (keep-alive, close, upgrade) name nothing beyond HOP_BY_HOP.
        if len(name) == 10 and name.lower() == b"connection":
            if value in _COMMON_CONNECTION_VALUES:
                continue
            tokens = {t.strip(b" \t").lower() for t in value.split(b",")}
            extra = tokens if extra is None else extra | tokens
    return base if extra is None else base | (extra - _PROTECTED)


AUTH_HEADER = b"x-pico-authorization"


def take_credentials(headers: Headers) -> tuple[bytes | None, Headers]:
    """The credentials of a request for Pico itself, and the headers without them.

    `x-pico-authorization` wins and is removed (the service's own `Authorization` passes
    untouched); without it, `Authorization` is taken and removed.
    """
    for wanted in (AUTH_HEADER, b"authorization"):
        found = [v for n, v in headers if n.lower() == wanted]
        if found:
            return found[-1], [(n, v) for n, v in headers if n.lower() != wanted]
    return None, headers


def render_trailers(trailers: Headers) -> bytes:
    """The last chunk of a chunked body: `0`, the trailer fields that may pass, a blank line."""
    if not trailers:
        return b"0\r\n\r\n"
    out = [b"0\r\n"]
    for name, value in trailers:
        if name.lower() not in _TRAILER_DROP:
            out += (name, b": ", value, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def rewrite_request_head(
    method: bytes,
    url: bytes,
    headers: Headers,
    *,
    framing: Framing,
    client_ip: str,
    upgrade: bytes | None,
    forwarded: bool,
    forward_mark: bytes | None,
    trusted_client: bool = False,
    scheme: bytes = b"http",
) -> bytes:
    """The request head to send upstream, as HTTP/1.1.

    Drops hop-by-hop headers and the client's framing headers, and states the body as `framing`
    says. Appends the client to X-Forwarded-For and sets X-Forwarded-Proto (`scheme`: what the
    client spoke to us) and X-Forwarded-Host;
    the client's own are kept only from a `trusted_client` (a load balancer listed in
    `proxy.trusted_proxies`, which may have set them). A request that another node forwarded
    already carries them and is passed unchanged. `forward_mark` is the `x-pico-forward` value for
    the hop to another node (None: not forwarded).
    """
    keep_client = trusted_client or forwarded
    body = framing.body
    chunked = body is BODY_CHUNKED
    drop = _drop_set(headers, _DROP if chunked else _DROP_UNCHUNKED)
    out = [method, b" ", url, b" HTTP/1.1\r\n"]
    xff: bytes | None = None
    host: bytes | None = None
    has_proto = has_fhost = False
    for name, value in headers:
        lname = name.lower()
        if lname in drop:
            continue
        if lname == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
            continue
        if lname == b"host":
            host = value
        elif lname == b"x-forwarded-proto":
            if not keep_client:
                continue  # anyone could claim https: Pico says what it saw
            has_proto = True
        elif lname == b"x-forwarded-host":
            if not keep_client:
                continue
            has_fhost = True
        elif lname == FORWARD_HEADER:
            continue
        out += (name, b": ", value, b"\r\n")
    if forwarded:
        if xff is not None:
            out += (b"X-Forwarded-For: ", xff, b"\r\n")
    else:
        ip = client_ip.encode()
        out += (b"X-Forwarded-For: ", (xff + b", " + ip) if xff else ip, b"\r\n")
        if not has_proto:
            out += (b"X-Forwarded-Proto: ", scheme, b"\r\n")
        if not has_fhost and host is not None:
            out += (b"X-Forwarded-Host: ", host, b"\r\n")
    if forward_mark is not None:
        out += (b"x-pico-forward: ", forward_mark, b"\r\n")
    if chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    elif body is BODY_LENGTH:
        out.append(b"Content-Length: %d\r\n" % framing.length)
    if upgrade is not None:
        out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def rewrite_response_head(
    status: int,
    reason: bytes,
    headers: Headers,
    *,
    framing: Framing,
    chunked: bool,
    close: bool,
    upgrade: bool,
) -> bytes:
    """The response head to send to the client, as HTTP/1.1, without hop-by-hop headers.

    The body is stated as `framing` says; `chunked` is false where a chunked body is de-chunked
    (for an HTTP/1.0 client: it then ends by closing, and its `Trailer` header is dropped).
    """
    drop = _drop_set(headers, _RESPONSE_DROP if chunked else _RESPONSE_DROP_UNCHUNKED)
    out = [_status_line(status, reason)]
    for name, value in headers:
        if name.lower() not in drop:
            out += (name, b": ", value, b"\r\n")
    if upgrade:
        for name, value in headers:
            if name.lower() == b"upgrade":
                out += (b"Connection: Upgrade\r\nUpgrade: ", value, b"\r\n")
                break
    elif chunked:
        if framing.codings:
            out += (b"Transfer-Encoding: ", framing.codings, b", chunked\r\n")
        else:
            out.append(b"Transfer-Encoding: chunked\r\n")
    elif framing.body is BODY_LENGTH:
        out.append(b"Content-Length: %d\r\n" % framing.length)
    elif framing.stated_length is not None:
        out += (b"Content-Length: ", framing.stated_length, b"\r\n")
    if close and not upgrade:
        out.append(b"Connection: close\r\n")
    out.append(b"\r\n")
    return b"".join(out)


_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def _status_line(status: int, reason: bytes) -> bytes:
    """`HTTP/1.1 <status> <reason>\\r\\n`, cached for the common (status, reason) pairs."""
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason or _reason(status))
        if len(_STATUS_LINES) < 1024:  # reasons come from services: bound the cache
            _STATUS_LINES[key] = line
    return line


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def error_response(
    status: int,
    message: str,
    *,
    close: bool,
    undelivered: bool = False,
    headers: Sequence[tuple[bytes, bytes]] = (),
    head_request: bool = False,
) -> bytes:
    """A complete JSON error response: `{"error": message}` plus a newline.

    `undelivered` marks, for the node that forwarded the request, that no service saw it;
    `headers` are added as they are (`Allow` on a 405). The answer to a HEAD request has the
    head only (a body would be read as the start of the next response).
    """
    body = orjson.dumps({"error": message}) + b"\n"
    head = (
        b"HTTP/1.1 %d %s\r\n"
        b"Content-Type: application/json\r\n"
        b"X-Content-Type-Options: nosniff\r\n"
        b"Content-Length: %d\r\n" % (status, _reason(status), len(body))
    )
    for name, value in headers:
        head += name + b": " + value + b"\r\n"
    if undelivered:
        head += UNDELIVERED_HEADER + b": true\r\n"
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" if head_request else head + b"\r\n" + body
