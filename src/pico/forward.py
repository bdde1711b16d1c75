"""Reaching a TCP endpoint from outside: one WebSocket per connection to the proxy port.

`open_connection(endpoint, url=..., api_key=..., ssl=...)` returns asyncio streams connected to
the endpoint's service; `Forwarder` (`pico forward tcp`) listens on a local address and
carries each accepted connection the same way. The WebSocket is `GET /_pico/v1/tcp/{id}`
(pico.server.tcp is the node's end): binary messages carry the bytes; a FIN from either TCP
side becomes a Close frame (1000) and the other side keeps sending until it is done too.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_module
import struct
from collections.abc import Callable
from typing import cast

from pico import log
from pico.http.request import TCP_PATH
from pico.mux.buffers import PooledReads, ReadBuffers, write_unpinned
from pico.mux.handshake import HandshakeError, open_websocket
from pico.mux.upgrade import Target
from pico.mux.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    ZERO_KEY,
    FrameDecoder,
    PongCoalescer,
    WebSocketError,
    encode_frame,
    frame_header,
    join_small,
)

# Frames from the node carry at most what one read of its tunnel gave: this bounds nothing in
# memory (payloads are relayed as they arrive), only a broken peer.
_MAX_FRAME = 1 << 62
_NORMAL = 1000
# A payload up to this size is joined with its frame header into one write; a bigger one is
# written with it (writelines: one syscall), not copied.
_JOIN_LIMIT = 16 * 1024
# The most one read of either connection takes: a 1 MiB transfer is a few reads, and the
# kernel copies straight into a pooled buffer (no bytes object per read). A buffer is reused
# once nothing holds a view of it; a local client that reads slowly makes its transport keep
# at most one view (later writes are copied once it buffers), so each such connection pins at
# most one buffer of this size until the client catches up.
READ_SIZE = 256 * 1024
# Bounds a connection's setup; longer than the agent's 10 s dial to the service, so a slow
# service is the node's 504 rather than a timeout here.
CONNECT_TIMEOUT = 15.0
_READ_BUFFERS = ReadBuffers(READ_SIZE, keep=8)
_log = log.get_logger("forward")


class ForwardError(ConnectionError):
    """The node refused the connection: the HTTP `status` and its `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


def tcp_url(server_url: str, endpoint: str) -> str:
    """The URL of `endpoint`'s WebSocket under the proxy URL `server_url` (a path prefix is
    kept; http and https mean ws and wss)."""
    return server_url.rstrip("/") + TCP_PATH.decode() + endpoint


class NodeDialer:
    """Opens WebSockets to one endpoint's TCP route: what is the same for every connection
    (the parsed URL, the auth header) is worked out once."""

    def __init__(
        self,
        endpoint: str,
        *,
        url: str,
        api_key: str = "",
        ssl: ssl_module.SSLContext | None = None,
        timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        """Raises ValueError for a URL that cannot be parsed."""
        self.target = Target.parse(tcp_url(url, endpoint))
        self.headers = {"x-pico-authorization": f"Bearer {api_key}"} if api_key else {}
        self.ssl = ssl
        self.timeout = timeout

    async def connect(self) -> tuple[asyncio.Transport, bytes]:
        """Open one WebSocket: (transport paused for reading, bytes past the 101).

        Raises ForwardError when the node refuses (unknown endpoint, auth, wrong protocol),
        OSError or TimeoutError when it cannot be reached. Cancelling closes it.
        """
        try:
            return await open_websocket(
                self.target, self.headers, timeout=self.timeout, ssl_context=self.ssl
            )
        except HandshakeError as exc:
            raise ForwardError(exc.status, exc.message) from None


async def connect_websocket(
    endpoint: str,
    *,
    url: str,
    api_key: str = "",
    ssl: ssl_module.SSLContext | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> tuple[asyncio.Transport, bytes]:
    """Open the WebSocket to `endpoint`: (transport paused for reading, bytes past the 101).

    Raises ForwardError when the node refuses (unknown endpoint, auth, wrong protocol),
    OSError or TimeoutError when it cannot be reached.
    """
    dialer = NodeDialer(endpoint, url=url, api_key=api_key, ssl=ssl, timeout=timeout)
    return await dialer.connect()


class WebSocketSide(asyncio.BufferedProtocol):
    """The WebSocket to the node, carrying one TCP connection (`LocalSide`'s)."""

    def __init__(self, local: LocalSide, on_error: Callable[[str], None]) -> None:
        self.local = local
        self.on_error = on_error
        self.transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder(expect_mask=False, max_frame=_MAX_FRAME)
        # A node that pings without reading must not grow our write buffer by a pong each.
        self._pongs = PongCoalescer()
        self._reads = PooledReads(_READ_BUFFERS)
        self._close_sent = False
        self._close_received = False
        self._failed = False  # an error was reported: the loss that follows is not another
        self.bytes_sent = 0
        self.bytes_received = 0

    def attach(self, transport: asyncio.Transport, rest: bytes) -> None:
        """Take over the connection `connect_websocket` opened."""
        self.transport = transport
        transport.set_protocol(self)
        if rest:
            self.data_received(rest)
        transport.resume_reading()

    # -- local -> node --------------------------------------------------------------------------

    def send(self, data: bytes | memoryview) -> None:
        """Send local bytes as one binary message (masked with the zero key: not copied).

        `data` may be a view of a read buffer: it is copied only if the transport already
        holds unsent bytes (it would keep the view)."""
        transport = self.transport
        if transport is None or self._close_sent:
            return
        n = len(data)
        self.bytes_sent += n
        header = frame_header(OP_BINARY, n, mask_key=ZERO_KEY)
        if n <= _JOIN_LIMIT:
            transport.write(b"".join((header, data)))  # one write, one syscall
            return
        if type(data) is memoryview and transport.get_write_buffer_size():
            data = bytes(data)
        transport.writelines((header, data))  # one syscall; big: not copied to be joined

    def send_close(self) -> None:
        """The local side sent FIN: say so with a Close frame; keep reading."""
        if self.transport is None or self._close_sent:
            return
        self._close_sent = True
        self.transport.write(
            encode_frame(OP_CLOSE, struct.pack(">H", _NORMAL), mask=True, random_key=False)
        )
        self._maybe_done()

    # -- node -> local --------------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reads.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._reads.deliver(nbytes, self.data_received)

    def data_received(self, data: bytes | memoryview) -> None:
        try:
            payloads, controls = self._decoder.feed(data)
        except WebSocketError as exc:
            self.on_error(f"bad frame from the node: {exc}")
            self.abort()
            return
        if len(payloads) > 1:
            payloads = join_small(payloads, _JOIN_LIMIT)
        for piece in payloads:
            self.bytes_received += len(piece)
            self.local.write(piece)
        for control in controls:
            if control.opcode == OP_CLOSE:
                self._closed_by_node(control.payload)
            elif control.opcode == OP_PING:
                self._pong(self._pongs.ping(control.payload))

    def _pong(self, payload: bytes | None) -> None:
        if payload is not None and self.transport is not None:
            self.transport.write(encode_frame(OP_PONG, payload, mask=True, random_key=False))

    def _closed_by_node(self, payload: bytes) -> None:
        self._close_received = True
        code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else _NORMAL
        if code != _NORMAL:
            reason = payload[2:].decode("utf-8", "replace") or f"close code {code}"
            self.on_error(f"connection closed by the node: {reason}")
            self.abort()
            return
        self.local.write_eof()  # the service is done sending; we may still be
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._close_sent and self._close_received:
            if self.transport is not None:
                self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._reads.release()
        if not self._close_received:
            if not self._failed:
                self.on_error("connection to the node lost")
            self.local.abort()
        else:
            self.local.close()

    def pause_writing(self) -> None:
        """The node does not read what we send: the local side is not read, pings are held."""
        self._pongs.pause()
        self.local.pause_reading()

    def resume_writing(self) -> None:
        self._pong(self._pongs.resume())
        self.local.resume_reading()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def abort(self) -> None:
        self._failed = True
        if self.transport is not None:
            self.transport.abort()
        self.local.abort()


class LocalSide(asyncio.BufferedProtocol):
    """A local TCP connection carried over a `WebSocketSide`. Reading waits for the socket."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.ws: WebSocketSide | None = None
        self.peer = ""
        self._reads = PooledReads(_READ_BUFFERS)
        self._early: list[bytes] = []  # read before the WebSocket was up
        self._eof = False
        self._closed = asyncio.get_running_loop().create_future()

    @property
    def closed(self) -> asyncio.Future[None]:
        """Done when the local connection is gone."""
        return self._closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()  # until the WebSocket is up
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"

    def bridge(self, ws: WebSocketSide) -> None:
        """Start carrying bytes both ways."""
        self.ws = ws
        early, self._early = self._early, []
        for data in early:
            ws.send(data)
        if self.transport is not None:
            self.transport.resume_reading()
        if self._eof:
            ws.send_close()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reads.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._reads.deliver(nbytes, self.data_received)

    def data_received(self, data: bytes | memoryview) -> None:
        if self.ws is not None:
            self.ws.send(data)
        else:
            # uvloop reads once after connection_made whatever it was told there: keep the
            # bytes for the WebSocket, and pause again (bounded: one read).
            self._early.append(bytes(data))
            if self.transport is not None:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        if self.ws is not None:
            self.ws.send_close()
        return True  # half-closed: the answer may still be coming

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._reads.release()
        if not self._closed.done():
            self._closed.set_result(None)
        ws, self.ws = self.ws, None  # no cycle with it: both are freed by refcount
        if ws is not None and ws.transport is not None:
            if exc is None and self._eof:
                ws.send_close()
            else:
                ws.transport.abort()

    def pause_writing(self) -> None:
        if self.ws is not None:
            self.ws.pause_reading()

    def resume_writing(self) -> None:
        if self.ws is not None:
            self.ws.resume_reading()

    # -- what the WebSocket side asks --------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        if self.transport is not None:
            write_unpinned(self.transport, data)

    def write_eof(self) -> None:
        t = self.transport
        if t is not None and t.can_write_eof():
            t.write_eof()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.ws is not None:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_connection(
    endpoint: str,
    *,
    url: str = "http://localhost:8000",
    api_key: str = "",
    ssl: ssl_module.SSLContext | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the TCP endpoint `endpoint` through the proxy port at `url`.

    Returns asyncio streams once the agent has connected to the service; `writer.write_eof()`
    half-closes (the service reads EOF) and `reader` sees EOF once the service closed its
    side. Raises ForwardError when the node refuses: unknown endpoint (502 `no available
    upstreams`), a service that refused or could not be reached (502 `upstream unreachable`,
    504 `upstream timeout`), auth (401/403), an http endpoint (400); OSError or TimeoutError
    when the node cannot be reached. Cancelling closes everything it opened.
    """
    transport, rest = await connect_websocket(
        endpoint, url=url, api_key=api_key, ssl=ssl, timeout=timeout
    )
    loop = asyncio.get_running_loop()
    # The caller's streams are one end of a socket pair; the other end is bridged to the
    # WebSocket by Protocol callbacks (no task to own).
    ours, theirs = socket.socketpair()
    try:
        _, local = await loop.connect_accepted_socket(LocalSide, ours)
        ws = WebSocketSide(local, lambda why: _log.warn("connection error", error=why))
        ws.attach(transport, rest)
        local.bridge(ws)
        return await asyncio.open_connection(sock=theirs)
    except BaseException:
        transport.abort()
        ours.close()
        theirs.close()
        raise


class _Refused(asyncio.Protocol):
    """A local connection over `max_connections`: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class Forwarder:
    """`pico forward tcp`: a local listener whose connections reach one TCP endpoint."""

    def __init__(
        self,
        endpoint: str,
        *,
        url: str,
        api_key: str = "",
        ssl: ssl_module.SSLContext | None = None,
        timeout: float = CONNECT_TIMEOUT,
        max_connections: int = 1024,
    ) -> None:
        self.endpoint = endpoint
        self.url = url
        self.max_connections = max_connections
        self.refused = 0  # connections closed at once for max_connections
        # A local client that reconnects while the node refuses must not write a line per
        # attempt: one per failure (its text is the node's) a minute, with the count dropped.
        self._failures = log.RateLimited(_log, level="error")
        self._dialer = NodeDialer(endpoint, url=url, api_key=api_key, ssl=ssl, timeout=timeout)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def connections(self) -> int:
        """Connections accepted and not yet finished."""
        return len(self._tasks)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on (host, port); returns the bound address. Raises OSError."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accepted, host or None, port)
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    def _accepted(self) -> asyncio.BaseProtocol:
        if len(self._tasks) >= self.max_connections:
            self.refused += 1
            _log.warn_throttled(
                "connection refused: max_connections reached",
                endpoint_id=self.endpoint,
                max_connections=self.max_connections,
            )
            return _Refused()
        local = LocalSide()
        task = asyncio.get_running_loop().create_task(self._carry(local))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return local

    async def _carry(self, local: LocalSide) -> None:
        def failed(why: str) -> None:
            message = f"connection to {self.endpoint} failed: {why}"
            self._failures.warn(message, message, endpoint_id=self.endpoint, client=local.peer)

        try:
            transport, rest = await self._dialer.connect()
        except ForwardError as exc:
            failed(f"{exc.status} {exc.message}")
            local.abort()
            return
        except (OSError, TimeoutError) as exc:
            failed(f"cannot reach {self.url}: {exc or type(exc).__name__}")
            local.abort()
            return
        if local.transport is None:  # the local client left meanwhile
            transport.abort()
            return
        ws = WebSocketSide(local, failed)
        ws.attach(transport, rest)
        local.bridge(ws)
        _log.info("connection opened", endpoint_id=self.endpoint, client=local.peer)
        try:
            await local.closed
        finally:
            ws.abort()  # already closed, or the forwarder is stopping
        _log.info(
            "connection closed",
            endpoint_id=self.endpoint,
            client=local.peer,
            bytes_sent=ws.bytes_sent,
            bytes_received=ws.bytes_received,
        )

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
