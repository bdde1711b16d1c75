"""The agent's WebSocket upgrade on a raw asyncio transport: `open_websocket()`.

A thin shim over `pico.mux.upgrade.ClientHandshake`: it connects, writes the request, feeds
the answer to the handshake, and returns the transport once the node has switched protocols,
ready for a `Tunnel` to `attach()`. The node's end is `pico.server.upstream`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import cast

from pico.mux.upgrade import ClientHandshake, Rejected, Switched, Target

# A server that accepts the TCP connection but never answers must not hang the agent.
HANDSHAKE_TIMEOUT = 30.0


class HandshakeError(Exception):
    """The server refused the upgrade: the HTTP `status` and its `message` (its JSON error)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if message else str(status))
        self.status = status
        self.message = message


class _ClientProtocol(asyncio.Protocol):
    """Writes the upgrade request and feeds the answer to a `ClientHandshake`."""

    def __init__(self, handshake: ClientHandshake) -> None:
        self.handshake = handshake
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.handshake.request)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        match self.handshake.receive_data(data):
            case Switched(rest):
                # The node may send frames right after the 101; nobody reads them until the
                # tunnel takes over the transport (which resumes reading), so stop reading here.
                if self.transport is not None:
                    self.transport.pause_reading()
                self.done.set_result(rest)
            case Rejected(status, reason):
                self._fail(HandshakeError(status, reason))
            case None:
                pass

    def eof_received(self) -> bool:
        if not self.done.done():
            match self.handshake.receive_eof():
                case Rejected(status, reason):
                    self._fail(HandshakeError(status, reason))
                case None:
                    self._fail(ConnectionError("connection closed during the WebSocket handshake"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("connection closed during handshake"))

    def _fail(self, exc: Exception) -> None:
        self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


async def open_websocket(
    url: str | Target,
    headers: Mapping[str, str] | None = None,
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[asyncio.Transport, bytes]:
    """Connect to a ws:// or wss:// `url` (or its parsed `Target`) and complete the upgrade.

    Returns the transport, paused for reading, and any bytes received past the handshake:
    pass both to `Tunnel.attach(transport, rest, resume=True)`. Raises HandshakeError
    when the server answers with an HTTP error, OSError/TimeoutError on network failures,
    ValueError for a URL or header that cannot be sent. Cancelling closes the connection.
    """
    target = Target.parse(url) if isinstance(url, str) else url
    handshake = ClientHandshake(target, headers)
    loop = asyncio.get_running_loop()
    context = ssl_context
    if context is None and target.secure:
        context = ssl.create_default_context()
    # A timeout in this task, not wait_for's task around it: one task fewer per connection.
    async with asyncio.timeout(timeout):
        transport, protocol = await loop.create_connection(
            lambda: _ClientProtocol(handshake),
            target.host,
            target.port,
            ssl=context,
            server_hostname=target.host if context is not None else None,
        )
        try:
            rest = await protocol.done
        except BaseException:
            transport.close()
            raise
    return transport, rest
