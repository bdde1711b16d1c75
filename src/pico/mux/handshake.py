"""The WebSocket opening handshake on raw asyncio transports, for both ends of a tunnel.

Server side: `upgrade_error()` checks a parsed upgrade request and `accept_response()` builds
the 101. Client side: `open_websocket()` connects, sends the upgrade request and returns the
transport once the server has switched protocols, ready for a `Tunnel` to `attach()`.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.parse
from collections.abc import Mapping
from typing import cast

import httptools
import orjson

from pico.mux.websocket import accept_key, new_key

# A server that accepts the TCP connection but never answers must not hang the agent.
HANDSHAKE_TIMEOUT = 30.0
# Bound on an error body we read from a server that refused the upgrade.
_MAX_ERROR_BODY = 64 * 1024


class HandshakeError(Exception):
    """The server answered the upgrade with an HTTP error; `status` and its JSON `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if message else str(status))
        self.status = status
        self.message = message


def upgrade_error(method: bytes, headers: Mapping[str, str]) -> str | None:
    """Why a request is not a valid WebSocket upgrade (None if it is). Header names lower-case."""
    if method != b"GET":
        return "expected GET for a WebSocket upgrade"
    if "websocket" not in headers.get("upgrade", "").lower():
        return "expected a WebSocket upgrade"
    if "upgrade" not in headers.get("connection", "").lower():
        return "expected Connection: Upgrade"
    if headers.get("sec-websocket-version", "") != "13":
        return "unsupported Sec-WebSocket-Version (expected 13)"
    if not headers.get("sec-websocket-key"):
        return "missing Sec-WebSocket-Key"
    return None


def accept_response(key: str) -> bytes:
    """The `101 Switching Protocols` response for a client's Sec-WebSocket-Key."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n\r\n"
    )


class _ClientHandshake(asyncio.Protocol):
    """Sends the upgrade request and parses the response head."""

    def __init__(self, request: bytes, key: str) -> None:
        self.request = request
        self.expected_accept = accept_key(key)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.headers: dict[str, str] = {}
        self.body = b""
        self.status = 0
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._switched(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self._fail(HandshakeError(502, f"malformed handshake response: {exc}"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if len(self.body) < _MAX_ERROR_BODY:
            self.body += body[: _MAX_ERROR_BODY - len(self.body)]

    def on_message_complete(self) -> None:
        if self.status == 101:
            return  # the upgrade exception follows
        self._fail(HandshakeError(self.status, _error_message(self.body)))

    def _switched(self, rest: bytes) -> None:
        if self.status != 101:
            self._fail(HandshakeError(self.status, "unexpected upgrade"))
        elif self.headers.get("sec-websocket-accept") != self.expected_accept:
            self._fail(HandshakeError(502, "bad Sec-WebSocket-Accept from server"))
        elif not self.done.done():
            # The server may send frames right after the 101; nobody reads them until the
            # tunnel takes over the transport (which resumes reading), so stop reading here.
            if self.transport is not None:
                self.transport.pause_reading()
            self.done.set_result(rest)

    def _fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        if not self.done.done():
            if self.status and self.status != 101:
                self._fail(HandshakeError(self.status, _error_message(self.body)))
            else:
                self._fail(ConnectionError("connection closed during the WebSocket handshake"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("connection closed during handshake"))


def _error_message(body: bytes) -> str:
    try:
        value = orjson.loads(body)
        if isinstance(value, dict) and isinstance(value.get("error"), str):
            return str(value["error"])
    except orjson.JSONDecodeError:
        pass
    return body.decode("utf-8", "replace").strip()[:200]


async def open_websocket(
    url: str,
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[asyncio.Transport, bytes]:
    """Connect to a ws:// or wss:// `url` and complete the upgrade.

    Returns the transport, paused for reading, and any bytes received past the handshake:
    pass both to `Tunnel.attach(transport, rest, resume=True)`. Raises HandshakeError
    when the server answers with an HTTP error, OSError/TimeoutError on network failures.
    """
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme in ("wss", "https")
    host = parts.hostname or "localhost"
    port = parts.port or (443 if secure else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = new_key()
    host_header = host if parts.port is None else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if parts.port is None else f"[{host}]:{port}"
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host_header}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    loop = asyncio.get_running_loop()
    context = (
        ssl_context
        if ssl_context is not None
        else (ssl.create_default_context() if secure else None)
    )

    async def handshake() -> tuple[asyncio.Transport, bytes]:
        transport, protocol = await loop.create_connection(
            lambda: _ClientHandshake(request, key),
            host,
            port,
            ssl=context,
            server_hostname=host if context is not None else None,
        )
        try:
            rest = await protocol.done
        except BaseException:
            transport.close()
            raise
        return transport, rest

    return await asyncio.wait_for(handshake(), timeout)
