"""One response read off a channel and relayed to the client as it arrives.

`ResponseReader` is the response direction of an exchange: it owns the httptools response
parser and the `Receive` state (states.py), decides the response's framing once from the parsed
head (framing.py), writes the head, the body and the trailers to the client, and tells its
exchange (`ResponseEvents`) when the response is complete, broken, an upgrade, or only the
"not delivered" of another node.
"""

from __future__ import annotations

from typing import Protocol

import httptools

from pico.http.channel import ClientSide
from pico.http.framing import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    NO_BODY,
    BadResponse,
    Framing,
    response_framing,
)
from pico.http.head import UNDELIVERED_HEADER, Headers, render_trailers, rewrite_response_head
from pico.http.request import Request
from pico.http.states import (
    AWAITING_HEAD,
    DONE,
    FINAL,
    RECEIVE_TRANSITIONS,
    RELAYING,
    UPGRADED,
    Receive,
    TransitionError,
)

# A response head (or its trailers) bigger than this is refused (502): it protects the node's
# memory.
MAX_RESPONSE_HEAD = 256 * 1024


class ResponseEvents(Protocol):
    """What a `ResponseReader` tells its exchange."""

    def completed(self, keep_alive: bool) -> None:
        """The response is complete; `keep_alive` says whether the service may take another
        request on this channel."""

    def broken(self, why: str) -> None:
        """The response cannot be relayed (malformed, ambiguous, too big)."""

    def upgraded(self) -> None:
        """A 101 was relayed (with the new protocol's first bytes): splice both ways now."""


class _Detached:
    """The events of a reader whose exchange is over: nothing is listening."""

    def completed(self, keep_alive: bool) -> None:
        pass

    def broken(self, why: str) -> None:
        pass

    def upgraded(self) -> None:
        pass


_DETACHED = _Detached()


class ResponseReader:
    """The response side of one exchange, across the channels it tries."""

    __slots__ = (
        "body_left",
        "bytes_out",
        "chunked_out",
        "close_client",
        "conn",
        "events",
        "framing",
        "got_bytes",
        "head_bytes",
        "head_size",
        "headers",
        "lengths",
        "parser",
        "progressed",
        "reason",
        "received_headers",
        "remote",
        "request",
        "stalled",
        "state",
        "status",
        "stray_bytes",
        "trailers",
        "transfer_codings",
        "undelivered",
    )

    def __init__(self, conn: ClientSide, request: Request, events: ResponseEvents) -> None:
        self.conn = conn
        self.request = request
        self.events: ResponseEvents = events
        self.state = AWAITING_HEAD
        self.remote = False  # the channel leads to another node (which may say "undelivered")
        self.parser: httptools.HttpResponseParser | None = None
        self.got_bytes = False  # a response byte came back on the current channel
        self.status = 0
        self.reason = b""
        self.headers: Headers = []
        # The framing fields of the head, picked out as they are parsed (no second pass).
        self.lengths: list[bytes] = []
        self.transfer_codings: list[bytes] = []
        self.trailers: Headers = []
        self.received_headers: Headers = []  # the final head as received, for the access log
        self.framing: Framing = NO_BODY
        self.chunked_out = False
        self.close_client = False
        # Bytes of a Content-Length body still to come: once the parser is past the head,
        # they are relayed as they arrive without it (no copy, no callbacks).
        self.body_left = 0
        self.bytes_out = 0
        self.head_bytes = 0  # response bytes received before the head was complete
        self.head_size = 0  # status, header names and values parsed so far (then trailers)
        self.stalled = 0  # bytes fed to the parser since it last reported a body or a field
        self.progressed = False
        self.stray_bytes = False  # the service sent more than one response
        self.undelivered = False  # the node we forwarded to answered "not delivered"

    def to(self, new: Receive) -> None:
        """Move to `new`; raises TransitionError if the table does not allow it."""
        old = self.state
        if new not in RECEIVE_TRANSITIONS[old]:  # states.check_receive, inlined: per request
            raise TransitionError(f"response side: {old.value} -> {new.value} is not allowed")
        self.state = new

    @property
    def ends_by_close(self) -> bool:
        """True while relaying a body that ends when the service closes the channel."""
        return self.state is RELAYING and self.framing.body is BODY_UNTIL_CLOSE

    def new_channel(self, remote: bool) -> None:
        """A (new) channel is attached: its response starts from the beginning."""
        self.remote = remote
        self.parser = None
        self.got_bytes = False
        self._new_head()
        self.undelivered = False

    def _new_head(self) -> None:
        """Forget the head parsed so far (an interim 1xx, or the start of a new channel)."""
        self.headers = []
        self.lengths = []
        self.transfer_codings = []
        self.reason = b""

    def detach(self) -> None:
        """The exchange is over. The parser refers back to this reader and this reader to its
        exchange: drop both links, so each is freed by its reference count at once instead of
        waiting for the cycle collector."""
        self.parser = None
        self.events = _DETACHED

    def feed(self, data: bytes | memoryview) -> None:
        """Parse (or, inside a Content-Length body, just relay) bytes from the channel."""
        self.got_bytes = True
        if self.body_left and self.state is RELAYING:
            self._relay_body(data)
            return
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpResponseParser(self)
        self.progressed = False
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._on_upgrade(data[exc.args[0] :])
            return
        except httptools.HttpParserError as exc:
            self.events.broken(f"malformed response from upstream: {exc}")
            return
        # httptools holds an unfinished header or trailer line whole: bound what it may hold
        # by the raw bytes fed while one is unfinished (body bytes never count).
        state = self.state
        if state is AWAITING_HEAD:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_RESPONSE_HEAD:
                self.events.broken("response head too large")
        elif state is RELAYING:
            self.stalled = 0 if self.progressed else self.stalled + len(data)
            if self.stalled > MAX_RESPONSE_HEAD:
                self.events.broken("response trailers too large")

    # -- httptools callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state in FINAL:
            self.stray_bytes = True  # another response after ours: the channel is unusable

    def on_status(self, reason: bytes) -> None:
        if self.state is AWAITING_HEAD:
            self.reason += reason
            self.head_size += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.progressed = True
        state = self.state
        if state is AWAITING_HEAD:
            self.headers.append((name, value))
            n = len(name)
            self.head_size += n + len(value) + 4
            if n == 14 or n == 17:  # the lengths of the framing fields' names: test those only
                lname = name.lower()
                if lname == b"content-length":
                    self.lengths.append(value)
                elif lname == b"transfer-encoding":
                    self.transfer_codings.append(value)
        elif state is RELAYING and not self.undelivered:
            self.trailers.append((name, value))
            self.head_size += len(name) + len(value) + 4
            if self.head_size > MAX_RESPONSE_HEAD:
                self.events.broken("response trailers too large")

    def on_headers_complete(self) -> None:
        if self.state is not AWAITING_HEAD:
            return
        if self.head_size > MAX_RESPONSE_HEAD:  # a head that came whole in one piece
            self.events.broken("response head too large")
            return
        assert self.parser is not None
        status = self.parser.get_status_code()
        req = self.request
        if not 100 <= status <= 599:
            self.events.broken(f"status {status} outside 100-599")  # RFC 9110 §15
            return
        if status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): relay it and keep waiting.
            if req.version != "1.0":
                self._write_bodiless_head(status, upgrade=False)
            self._new_head()
            return
        if (
            status >= 500
            and self.remote
            and any(n.lower() == UNDELIVERED_HEADER for n, _ in self.headers)
        ):
            # The other node could not deliver it either (its agent left, its endpoint moved):
            # no service saw the request; the exchange routes it again once this feed is over.
            self.undelivered = True
            return
        self.conn.response_timer.cancel()  # it bounds the wait for this head only
        self.status = status
        if status == 101:
            if req.upgrade is None:
                self.events.broken("unexpected upgrade from upstream")
            return  # the parser stops here with HttpParserUpgrade: `_on_upgrade` relays it
        self._relay_head(status)

    def _write_bodiless_head(self, status: int, *, upgrade: bool) -> None:
        """Relay a 1xx head (interim, or the 101 of an upgrade): no body, no framing."""
        self.conn.write(
            rewrite_response_head(
                status,
                self.reason,
                self.headers,
                framing=NO_BODY,
                chunked=False,
                close=False,
                upgrade=upgrade,
            )
        )

    def _relay_head(self, status: int) -> None:
        req = self.request
        assert self.parser is not None
        try:
            framing = response_framing(req.method, status, self.lengths, self.transfer_codings)
        except BadResponse as exc:
            self.events.broken(f"ambiguous response framing: {exc}")
            return
        old_client = req.version == "1.0"
        chunked = framing.body is BODY_CHUNKED
        if chunked and old_client and framing.codings:
            # De-chunked, the body would still be coded and nothing could say so.
            self.events.broken("transfer coding an HTTP/1.0 client cannot take")
            return
        self.framing = framing
        self.chunked_out = chunked and not old_client
        self.close_client = (
            not req.keep_alive
            or framing.body is BODY_UNTIL_CLOSE
            or (chunked and old_client)  # de-chunked: it ends by closing
            or req.upgrade is not None
            or not self.parser.should_keep_alive()
        )
        head = rewrite_response_head(
            status,
            self.reason,
            self.headers,
            framing=framing,
            chunked=self.chunked_out,
            close=self.close_client,
            upgrade=False,
        )
        self.to(RELAYING)
        self.head_size = 0  # trailers have a budget of their own
        self.received_headers, self.headers = self.headers, []
        self.conn.write(head)
        if framing.body is BODY_NONE:
            self.complete()
        elif framing.body is BODY_LENGTH:
            self.body_left = framing.length

    def on_body(self, body: bytes) -> None:
        if self.state is not RELAYING:
            return
        self.progressed = True
        self.bytes_out += len(body)
        if self.body_left:
            self.body_left -= len(body)
        if self.chunked_out:
            # writelines: no concatenated copy of the body (uvloop sends it with writev).
            self.conn.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
        else:
            self.conn.write(body)

    def on_message_complete(self) -> None:
        # A 101 ends its message too; the parser then stops with HttpParserUpgrade.
        if self.state is RELAYING and not self.undelivered:
            self.complete()

    # -- endings ---------------------------------------------------------------------------------

    def _relay_body(self, data: bytes | memoryview) -> None:
        """The next bytes of a Content-Length body, past the parser (it saw the head only)."""
        left = self.body_left
        n = len(data)
        if n > left:
            self.stray_bytes = True  # bytes after the response: the channel is unusable
            data = data[:left]
            n = left
        self.body_left = left - n
        self.bytes_out += n
        self.conn.write(data)
        if not self.body_left:
            self.complete()

    def complete(self) -> None:
        """The response is over (its framing said so, or the service closed an unframed one)."""
        self.to(DONE)
        if self.chunked_out:
            self.conn.write(render_trailers(self.trailers))
        keep_alive = (
            self.framing.body is not BODY_UNTIL_CLOSE
            and self.parser is not None
            and self.parser.should_keep_alive()
        )
        self.events.completed(keep_alive)

    def _on_upgrade(self, rest: bytes | memoryview) -> None:
        """The parser stopped at a 101: relay its head, then the exchange splices both ways."""
        if self.state is not AWAITING_HEAD:
            return  # already failed (the exchange answered)
        if self.status != 101 or self.request.upgrade is None:
            self.events.broken("unexpected upgrade from upstream")
            return
        self._write_bodiless_head(101, upgrade=True)
        self.received_headers, self.headers = self.headers, []
        if rest:
            self.conn.write(rest)
        self.to(UPGRADED)
        self.events.upgraded()
