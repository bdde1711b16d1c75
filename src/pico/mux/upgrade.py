"""The WebSocket upgrade that opens a tunnel, sans-I/O, for both ends.

Agent: `ClientHandshake(target, headers)` holds the upgrade `request` to send; feed it the
node's answer with `receive_data` (and `receive_eof`) until it returns `Switched` (a 101 with
the right Sec-WebSocket-Accept; the bytes past its head belong to the tunnel) or `Rejected`
(the node's JSON error, or 502 for an answer that is not HTTP or not a WebSocket 101).

Node: feed `ServerHandshake` the agent's request until it returns `Accepted` (a valid
WebSocket upgrade of `/pico/v1/upstream/{endpoint_id}` that `authorize` let through) or
`Rejected`; answer with `accept_response(key)` or `reject_response(rejected)`.

`None` from `receive_data` means "more bytes, please"; once a result is returned the
handshake is decided and takes no more input. No sockets, no clock: the caller owns the
connection and the timeouts (`pico.mux.handshake.open_websocket`, `pico.server.upstream`).
"""

from __future__ import annotations

import contextlib
import enum
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TypeVar

import httptools
import orjson

from pico.auth import AuthFailure, Token
from pico.http.head import error_response, valid_endpoint_id
from pico.mux.websocket import accept_key, handshake_problem, new_key

UPSTREAM_PATH = "/pico/v1/upstream/"
# The query parameter that says how the node serves the endpoint: `?protocol=tcp` (raw TCP
# connections through the proxy port's /_pico/v1/tcp/{id}); absent means http.
PROTOCOL_PARAM = "protocol"
PROTOCOLS = ("http", "tcp")
# The node's upstream port faces the internet: a request that has not reached its upgrade
# within this many bytes is refused with 431 (a body counts; an upgrade request has none).
MAX_REQUEST_HEAD = 16 * 1024
# What the agent reads of an answer: a longer head is malformed, and the first bytes of an
# error body say what went wrong (the rest is not waited for).
MAX_RESPONSE_HEAD = 64 * 1024
MAX_ERROR_BODY = 64 * 1024
# A reason is meant for one log line.
_MAX_REASON = 200

Header = tuple[bytes, bytes]
_Result = TypeVar("_Result", bound="Switched | Rejected")
_CHALLENGE: tuple[Header, ...] = ((b"WWW-Authenticate", b"Bearer"),)

Authorize = Callable[[str | None, str], Token | None]
"""The token check: `(Authorization value, endpoint id) -> Token | None`; raises AuthFailure."""


@dataclass(frozen=True, slots=True)
class Switched:
    """The node switched protocols; `rest` is what it sent past the 101's head (frames)."""

    rest: bytes


@dataclass(frozen=True, slots=True)
class Accepted:
    """A valid upgrade for `endpoint_id`: answer `accept_response(key)`, then run the tunnel.

    `token` is what `authorize` returned (None without a check); `rest` is what the agent
    sent past the request's head (frames, which belong to the tunnel); `protocol` is how the
    node serves the endpoint (http or tcp).
    """

    endpoint_id: str
    key: str
    token: Token | None
    rest: bytes
    protocol: str = "http"


@dataclass(frozen=True, slots=True)
class Rejected:
    """No tunnel: the HTTP `status`, a `reason` for the peer or the log, and the headers the
    error response carries (`WWW-Authenticate` on a 401)."""

    status: int
    reason: str
    headers: tuple[Header, ...] = ()


class State(enum.Enum):
    """Where a handshake is: reading a head, reading an error body (agent only), decided."""

    HEAD = "head"
    BODY = "body"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a ws:// or wss:// URL leads: what to connect to and what to ask for."""

    secure: bool
    host: str
    port: int
    authority: str  # the Host header
    path: str  # with the query

    @classmethod
    def parse(cls, url: str) -> Target:
        """The target of `url` (http:// and https:// mean ws:// and wss://). Raises ValueError."""
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme in ("wss", "https")
        host = parts.hostname or "localhost"
        port = parts.port or (443 if secure else 80)
        name = f"[{host}]" if ":" in host else host
        authority = name if parts.port is None else f"{name}:{port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(secure, host, port, authority, path)


def upgrade_request(target: Target, key: str, headers: Mapping[str, str] | None = None) -> bytes:
    """The GET that asks `target` to switch to a WebSocket, with `headers` added.

    Raises ValueError for a header with a line break (it would forge more headers).
    """
    extra = list((headers or {}).items())
    for name, value in extra:
        if any(c in name or c in value for c in "\r\n"):
            raise ValueError(f"line break in the {name!r} header of the upgrade request")
    lines = [
        f"GET {target.path} HTTP/1.1",
        f"Host: {target.authority}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def accept_response(key: str) -> bytes:
    """The `101 Switching Protocols` answer to a Sec-WebSocket-Key."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n\r\n"
    )


def reject_response(rejected: Rejected) -> bytes:
    """The JSON error (`{"error": reason}`) for a refused upgrade, with Connection: close."""
    return error_response(rejected.status, rejected.reason, close=True, headers=rejected.headers)


class ClientHandshake:
    """The agent's end: the upgrade `request`, then the node's answer checked as it arrives.

    Holds at most `max_head` bytes of head and `max_error_body` bytes of an error body.
    """

    def __init__(
        self,
        target: Target,
        headers: Mapping[str, str] | None = None,
        *,
        key: str | None = None,
        max_head: int = MAX_RESPONSE_HEAD,
        max_error_body: int = MAX_ERROR_BODY,
    ) -> None:
        self.key = key or new_key()
        self.request = upgrade_request(target, self.key, headers)
        self.max_head = max_head
        self.max_error_body = max_error_body
        self._accept = accept_key(self.key)
        self._message = _Message(response=True, max_body=max_error_body)
        self._head_size = 0
        self._state = State.HEAD

    @property
    def state(self) -> State:
        """HEAD until the answer's head is in, BODY while an error body is read, then DONE."""
        return self._state

    def receive_data(self, data: bytes) -> Switched | Rejected | None:
        """Take the next bytes of the answer: the result once known, else None.

        Never raises on bad input from the node (that is a `Rejected` 502); raises
        RuntimeError if the handshake is already decided.
        """
        _expect_input(self._state)
        if self._state is State.HEAD:
            room = self.max_head - self._head_size
            head = data if len(data) <= room else data[:room]
            self._head_size += len(head)
            result = self._parse(head, data)
            if result is not None:
                return result
            if self._state is State.HEAD:
                if len(head) < len(data):
                    return self._malformed(f"response head over {self.max_head} bytes")
                return None
            data = data[len(head) :]  # the head ended in `head`: the rest is error body
        return self._parse(data, data) if data else None

    def receive_eof(self) -> Rejected | None:
        """The node closed the connection: its error if it sent a whole head (the body ends
        at the close), else None (no answer: a network failure, not a refusal)."""
        _expect_input(self._state)
        if self._state is State.BODY:
            return self._decide(self._refusal())
        self._state = State.DONE
        return None

    def _parse(self, data: bytes, whole: bytes) -> Switched | Rejected | None:
        """Parse `data`, the start of `whole` (the bytes received this time)."""
        message = self._message
        try:
            upgrade_at = message.feed(data)
        except httptools.HttpParserError as exc:
            if message.complete and message.status == 101:  # llhttp: 101 without the headers
                return self._malformed("101 without Upgrade: websocket and Connection: Upgrade")
            return self._malformed(str(exc))
        if upgrade_at is not None:
            return self._switched(whole[upgrade_at:])
        if message.head_complete:
            self._state = State.BODY
            if message.complete or len(message.body) >= self.max_error_body:
                return self._decide(self._refusal())
        return None

    def _switched(self, rest: bytes) -> Switched | Rejected:
        headers = self._message.headers
        if self._message.status != 101:
            return self._malformed(f"upgrade with status {self._message.status}")
        if headers.get("upgrade", "").lower() != "websocket":
            return self._malformed("101 without Upgrade: websocket")
        if headers.get("sec-websocket-accept") != self._accept:
            return self._decide(Rejected(502, "bad Sec-WebSocket-Accept from server"))
        return self._decide(Switched(rest))

    def _refusal(self) -> Rejected:
        """The node's error: its JSON `error`, else its body as text, else its status line."""
        message = self._message
        reason = (
            _error_message(message.body)
            or _clean(message.reason.decode("latin-1"))
            or _phrase(message.status)
        )
        return Rejected(message.status, reason)

    def _malformed(self, problem: str) -> Rejected:
        return self._decide(Rejected(502, f"malformed handshake response: {problem}"))

    def _decide(self, result: _Result) -> _Result:
        self._state = State.DONE
        return result


class ServerHandshake:
    """The node's end: the agent's upgrade request checked as it arrives.

    Checks, in order: the path (404), the endpoint id and protocol (400), `accepting()` (503,
    the node is shutting down), that it is a WebSocket upgrade (400), then `authorize` (401
    with a Bearer challenge, or 403), then that `protocol_of(endpoint_id)` (the protocol the
    endpoint is served as here, None if it is not) is the requested one (409). A request not
    upgraded within `max_head` bytes gets 431.
    """

    def __init__(
        self,
        authorize: Authorize | None = None,
        *,
        accepting: Callable[[], bool] = lambda: True,
        protocol_of: Callable[[str], str | None] = lambda _: None,
        max_head: int = MAX_REQUEST_HEAD,
    ) -> None:
        self.max_head = max_head
        self._authorize = authorize
        self._accepting = accepting
        self._protocol_of = protocol_of
        self._message = _Message(response=False, max_body=0)
        self._size = 0
        self._state = State.HEAD

    @property
    def state(self) -> State:
        """HEAD until the request is decided, then DONE."""
        return self._state

    def receive_data(self, data: bytes) -> Accepted | Rejected | None:
        """Take the next bytes of the request: the result once known, else None.

        Never raises on bad input from the agent (that is a `Rejected`), nor on AuthFailure
        from `authorize`; raises RuntimeError if the handshake is already decided.
        """
        _expect_input(self._state)
        room = self.max_head - self._size
        head = data if len(data) <= room else data[:room]
        self._size += len(head)
        try:
            upgrade_at = self._message.feed(head)
        except httptools.HttpParserError as exc:
            return self._decide(Rejected(400, f"malformed request: {exc}"))
        if upgrade_at is not None:
            return self._decide(self._check(data[upgrade_at:]))
        if self._message.complete:  # a whole request that is no upgrade
            return self._decide(self._check(None))
        if len(head) < len(data):
            return self._decide(
                Rejected(431, f"request header fields too large (over {self.max_head} bytes)")
            )
        return None

    def _check(self, rest: bytes | None) -> Accepted | Rejected:
        """Decide on the whole request; `rest` is None if the parser saw no upgrade."""
        message = self._message
        target, _, query = message.target.decode("latin-1").partition("?")
        path = urllib.parse.unquote(target)
        if not path.startswith(UPSTREAM_PATH):
            return Rejected(404, "not found")
        endpoint_id = path[len(UPSTREAM_PATH) :]
        if not valid_endpoint_id(endpoint_id):
            return Rejected(400, "invalid endpoint id: use 1-128 characters of [A-Za-z0-9._-]")
        protocols = urllib.parse.parse_qs(query, keep_blank_values=True).get(
            PROTOCOL_PARAM, ["http"]
        )
        protocol = protocols[-1]
        if len(protocols) > 1 or protocol not in PROTOCOLS:
            return Rejected(400, f"invalid protocol {_clean(protocol)!r} (use http or tcp)")
        if not self._accepting():
            return Rejected(503, "node shutting down")
        problem = _upgrade_problem(message.method, message.headers)
        if problem is not None:
            return Rejected(400, problem)
        if rest is None:
            return Rejected(400, "expected a WebSocket upgrade")
        token = None
        if self._authorize is not None:
            try:
                token = self._authorize(message.headers.get("authorization"), endpoint_id)
            except AuthFailure as exc:
                return Rejected(exc.status, exc.message, _CHALLENGE if exc.status == 401 else ())
        served_as = self._protocol_of(endpoint_id)
        if served_as is not None and served_as != protocol:
            return Rejected(
                409,
                f"endpoint {endpoint_id!r} is registered as {served_as} on this node, "
                f"not {protocol}",
            )
        return Accepted(endpoint_id, message.headers["sec-websocket-key"], token, rest, protocol)

    def _decide(self, result: Accepted | Rejected) -> Accepted | Rejected:
        self._state = State.DONE
        return result


def _upgrade_problem(method: bytes, headers: Mapping[str, str]) -> str | None:
    """What makes a request no valid WebSocket upgrade (RFC 6455 §4.2.1), or None."""
    if method != b"GET":
        return "expected GET for a WebSocket upgrade"
    if "websocket" not in headers.get("upgrade", "").lower():
        return "expected a WebSocket upgrade"
    if "upgrade" not in headers.get("connection", "").lower():
        return "expected Connection: Upgrade"
    return handshake_problem(method, headers)


def _expect_input(state: State) -> None:
    if state is State.DONE:
        raise RuntimeError("the handshake is decided: its connection belongs to someone else")


class _Message:
    """The first HTTP/1.1 message of a connection, as httptools reports it.

    Header names are lower-cased (the last of a repeated header wins). Anything parsed after
    the message completed (a pipelined request) is ignored; so are interim 1xx responses
    other than 101 (the final answer follows them). At most `max_body` bytes of body are kept.
    """

    def __init__(self, *, response: bool, max_body: int) -> None:
        self.parser: httptools.HttpResponseParser | httptools.HttpRequestParser = (
            httptools.HttpResponseParser(self) if response else httptools.HttpRequestParser(self)
        )
        self.max_body = max_body
        self.method = b""
        self.target = b""
        self.status = 0
        self.reason = b""
        self.headers: dict[str, str] = {}
        self.body = b""
        self.head_complete = False
        self.complete = False

    def feed(self, data: bytes) -> int | None:
        """Parse `data`: the offset in it where another protocol starts, or None (no upgrade
        yet). Raises httptools.HttpParserError."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            return int(exc.args[0])
        return None

    def on_url(self, url: bytes) -> None:
        if not self.head_complete:
            self.target += url

    def on_status(self, status: bytes) -> None:
        if not self.head_complete:
            self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_complete:
            self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        if isinstance(self.parser, httptools.HttpResponseParser):
            self.status = self.parser.get_status_code()
        else:
            self.method = self.parser.get_method()
        self.head_complete = True

    def on_body(self, body: bytes) -> None:
        if not self.complete and len(self.body) < self.max_body:
            self.body += body[: self.max_body - len(self.body)]

    def on_message_complete(self) -> None:
        if self.complete:
            return
        if 100 <= self.status < 200 and self.status != 101:
            self.status, self.reason, self.headers, self.head_complete = 0, b"", {}, False
            return
        self.complete = True


def _error_message(body: bytes) -> str:
    """The `error` of a JSON error body, else the body as one clean line of text."""
    with contextlib.suppress(orjson.JSONDecodeError):
        value = orjson.loads(body)
        if isinstance(value, dict) and isinstance(value.get("error"), str):
            return _clean(value["error"])
    return _clean(body.decode("utf-8", "replace"))


def _clean(text: str) -> str:
    """`text` as one short line: whitespace runs become a space, other controls are dropped."""
    words = "".join(c if c.isprintable() or c.isspace() else "" for c in text).split()
    return " ".join(words)[:_MAX_REASON]


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"status {status}"
