"""A parsed client request, and the checks on its head.

`inspect_head()` finds the endpoint and the body framing, and refuses heads that two parties
could read differently (request smuggling: CL+TE, conflicting Content-Length, odd
Transfer-Encoding, duplicate Host) with `BadRequest`.
"""

from __future__ import annotations

from pico.http.head import ENDPOINT_HEADER, FORWARD_HEADER, endpoint_id


class BadRequest(Exception):
    """A request the proxy answers with `status` and closes the connection on."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    """One parsed client request and the body bytes waiting to be sent."""

    __slots__ = (
        "body",
        "body_done",
        "bytes_in",
        "chunked",
        "endpoint",
        "expects_body",
        "forward_claimed",
        "forwarded",
        "headers",
        "held",
        "host",
        "keep_alive",
        "method",
        "start",
        "upgrade",
        "url",
        "version",
    )

    def __init__(self, start: float) -> None:
        self.start = start
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.chunked = False
        self.expects_body = False
        self.upgrade: bytes | None = None
        self.endpoint = ""
        self.host = b""
        self.forward_claimed = False  # says x-pico-forward: true (trusted only from peers)
        self.forwarded = False
        self.body: list[bytes] = []
        self.held = 0  # bytes of this request counted in the pipeline budget
        self.body_done = False
        self.bytes_in = 0


def inspect_head(req: Request) -> None:
    """Set the endpoint and body framing of a complete head. Raises BadRequest."""
    content_lengths: set[bytes] = set()
    endpoint_header: bytes | None = None
    host: bytes | None = None
    transfer_encoding: bytes | None = None
    for name, value in req.headers:
        lname = name.lower()
        if lname == b"content-length":
            content_lengths.add(value.strip())
        elif lname == b"transfer-encoding":
            transfer_encoding = value.strip().lower()
        elif lname == b"host":
            if host is not None:
                raise BadRequest(400, "duplicate Host header")
            host = value
        elif lname == ENDPOINT_HEADER:
            endpoint_header = value
        elif lname == FORWARD_HEADER:
            req.forward_claimed = value.strip().lower() == b"true"
    # Request smuggling: a message whose length two parties could read differently.
    if len(content_lengths) > 1:
        raise BadRequest(400, "conflicting Content-Length headers")
    if transfer_encoding is not None:
        if content_lengths:
            raise BadRequest(400, "both Content-Length and Transfer-Encoding")
        if not transfer_encoding.endswith(b"chunked"):
            raise BadRequest(400, "unsupported Transfer-Encoding")
        req.chunked = True
    req.expects_body = req.chunked or any(v not in (b"0", b"") for v in content_lengths)
    req.host = host or b""
    req.endpoint = endpoint_id(endpoint_header, host)
