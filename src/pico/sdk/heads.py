"""The bound on a request head for the SDK's HTTP protocols (uvicorn's, on streams).

httptools keeps a head whole however long it grows, and uvicorn reads on while it does, so
whatever sends the head (a node, which bounds its clients' heads with proxy.max_header_bytes,
or anything posing as one) could make the app's process hold any amount of memory.
`BoundedHttpToolsProtocol` counts the bytes of each head and answers 431 past
`max_header_bytes`, as a node does. Trailers (fields after a chunked body) go through the same
parser and are held the same way: the bytes read since the last body byte count against the
same bound. (h11 has a bound of its own, set to the same number, trailers included.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pico import log

_log = log.get_logger("sdk")

# Above what a node sends with its default proxy.max_header_bytes (64 KiB of the client's head,
# plus its copy of Host as X-Forwarded-Host and under 1 KiB of other fields).
DEFAULT_MAX_HEADER_BYTES = 256 * 1024
# What `pico_agent_limit_rejections_total` names a head refused for max_header_bytes.
LIMIT_HEADER_BYTES = "max_header_bytes"
_BODY = b'{"error":"request header fields too large"}'
TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_BODY), _BODY)
)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on each request head.

    The bytes of a read are counted once it is parsed, and only if the head is still not
    complete then: a read that ends one head and starts a body is not counted, one that ends
    a request and starts the next head is, whole (the count errs high by at most one read).
    """

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        *,
        max_header_bytes: int,
        on_limit: Callable[[str], None],
    ) -> None:
        super().__init__(config=config, server_state=server_state, app_state=app_state)
        self.max_header_bytes = max_header_bytes
        self._on_limit = on_limit
        self._in_head = True  # the next bytes are (part of) a request head
        self._head_bytes = 0  # in the head: its bytes; after it, those since the last body byte
        self._body_seen = False  # the read being parsed gave body bytes

    def data_received(self, data: bytes) -> None:
        self._body_seen = False
        super().data_received(data)
        if self.transport.is_closing():
            return
        if not self._in_head and self._body_seen:
            # Body bytes came: what followed them in this read is not counted (errs low by
            # at most one read), and chunk framing between body bytes never adds up.
            self._head_bytes = 0
            return
        self._head_bytes += len(data)  # a head, or trailers (no body byte since the last)
        if self._head_bytes > self.max_header_bytes:
            self._too_large()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_seen = True
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True

    def _too_large(self) -> None:
        self._on_limit(LIMIT_HEADER_BYTES)
        _log.warn_throttled(
            "request refused: head over max_header_bytes", max_header_bytes=self.max_header_bytes
        )
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self.transport.abort()  # a response is on its way: a 431 cannot follow it
            return
        self.transport.write(TOO_LARGE)
        self.transport.close()
