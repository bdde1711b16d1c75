"""A parsed client request, and the checks on its head.

`inspect_head()` finds the endpoint, the request target and the body framing (framing.py), and
refuses heads that two parties could read differently (request smuggling: CL+TE, conflicting
Content-Length, odd Transfer-Encoding, duplicate Host) or that Pico does not serve (CONNECT)
with `BadRequest`.
"""

from __future__ import annotations

from pico.http.framing import BODY_CHUNKED, NO_BODY, BadRequest, Framing, request_framing
from pico.http.head import ENDPOINT_HEADER, FORWARD_HEADER, Headers, endpoint_id

__all__ = ["BadRequest", "Request", "inspect_head"]

# The proxy port's route for TCP endpoints: a WebSocket whose messages carry the bytes.
TCP_PATH = b"/_pico/v1/tcp/"

# Pico is a reverse proxy, not a forward proxy: every method but CONNECT is relayed.
_ALLOW = ((b"Allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE"),)


class Request:
    """One parsed client request and the body bytes waiting to be sent."""

    __slots__ = (
        "auth_expires",
        "body",
        "body_done",
        "bytes_in",
        "chunked",
        "endpoint",
        "expects_body",
        "forward_claim",
        "forwarded",
        "framing",
        "headers",
        "held",
        "host",
        "keep_alive",
        "method",
        "start",
        "tcp",
        "trailers",
        "upgrade",
        "url",
        "version",
    )

    def __init__(self, start: float) -> None:
        self.start = start
        self.url = b""
        self.headers: Headers = []
        self.trailers: Headers = []  # fields after a chunked body: relayed as trailers only
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.framing: Framing = NO_BODY
        self.chunked = False
        self.expects_body = False
        self.upgrade: bytes | None = None
        self.endpoint = ""
        self.host = b""
        # The x-pico-forward value: believed only with proof (a member's HMAC or address).
        self.forward_claim: bytes | None = None
        self.forwarded = False
        # `GET /_pico/v1/tcp/{id}`: a TCP connection over a WebSocket, for a TCP endpoint.
        self.tcp = False
        self.body: list[bytes] = []
        self.held = 0  # bytes of this request counted in the pipeline budget
        self.body_done = False
        self.bytes_in = 0
        # When the token the request was let in with expires (epoch seconds): an upgraded
        # connection (WebSocket, TCP) is closed then. None: no token, or no such limit.
        self.auth_expires: float | None = None


def inspect_head(req: Request, *, upgrade: bool) -> None:
    """Set the endpoint, target and body framing of a complete head. Raises BadRequest.

    `upgrade` is what the parser concluded (Connection: upgrade with an Upgrade header).
    """
    if req.version not in ("1.1", "1.0"):
        raise BadRequest(505, "HTTP version not supported")
    if req.method == b"CONNECT":
        raise BadRequest(405, "CONNECT is not supported", _ALLOW)
    content_lengths: list[bytes] = []
    transfer_encodings: list[bytes] = []
    endpoint_header: bytes | None = None
    host: bytes | None = None
    upgrade_value: bytes | None = None
    for name, value in req.headers:
        lname = name.lower()
        if lname == b"content-length":
            content_lengths.append(value)
        elif lname == b"transfer-encoding":
            transfer_encodings.append(value)
        elif lname == b"host":
            if host is not None:
                raise BadRequest(400, "duplicate Host header")
            host = value
        elif lname == ENDPOINT_HEADER:
            if endpoint_header is not None:
                raise BadRequest(400, "duplicate x-pico-endpoint header")
            endpoint_header = value
        elif lname == FORWARD_HEADER:
            req.forward_claim = value
        elif lname == b"upgrade":
            upgrade_value = value
    upgrading = upgrade and upgrade_value is not None
    framing = request_framing(req.version, content_lengths, transfer_encodings, upgrade=upgrading)
    req.framing = framing
    req.chunked = framing.body is BODY_CHUNKED
    req.expects_body = req.chunked or framing.length > 0
    if upgrading:
        req.upgrade = upgrade_value
    url = req.url
    if url == b"*" and req.method != b"OPTIONS":
        raise BadRequest(400, "invalid request target")  # RFC 9112 §3.2.4: OPTIONS only
    if url[:1] != b"/" and url != b"*":
        host = _absolute_form(req)
    elif host is None:
        host = _missing_host(req, endpoint_header)
    req.host = host
    url = req.url  # in origin form now: an absolute-form target names the same route
    if url.startswith(TCP_PATH):
        # The path names a TCP endpoint (whatever the headers say): see pico.server.tcp.
        req.tcp = True
        req.endpoint = url[len(TCP_PATH) :].partition(b"?")[0].decode("latin-1")
        return
    req.endpoint = endpoint_id(endpoint_header, host)


def _absolute_form(req: Request) -> bytes:
    """Route `GET http://authority/path` by its authority (RFC 9112 §3.2.2): the service gets
    the origin form and a Host that names the authority, whatever Host the client sent."""
    scheme, sep, rest = req.url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise BadRequest(400, "invalid request target")
    end = len(rest)
    for mark in (b"/", b"?", b"#"):
        i = rest.find(mark)
        if i != -1:
            end = min(end, i)
    authority, path = rest[:end], rest[end:]
    if not authority or b"@" in authority:
        raise BadRequest(400, "invalid request target")
    if path[:1] != b"/":
        path = b"/" + path
    req.url = path
    req.headers = [(n, v) for n, v in req.headers if n.lower() != b"host"]
    req.headers.append((b"Host", authority))
    return authority


def _missing_host(req: Request, endpoint_header: bytes | None) -> bytes:
    """A request without Host: HTTP/1.1 must have one (RFC 9112 §3.2); an HTTP/1.0 request
    that names its endpoint gets `Host: <endpoint id>`, since its service speaks HTTP/1.1."""
    if req.version == "1.0" and endpoint_header and endpoint_header.strip():
        host = endpoint_header.strip()
        req.headers.append((b"Host", host))
        return host
    raise BadRequest(400, "missing Host")
