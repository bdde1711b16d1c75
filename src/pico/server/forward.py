"""Forwarding to other nodes: a keep-alive pool of TCP connections to each node's proxy port
(over TLS to a node whose proxy port speaks TLS, verified with `cluster.tls`).

`NodeUpstream` is an `Upstream` whose channels are TCP connections (`TcpChannel`) that connect
lazily: bytes written before the connection is up wait in memory (bounded by the engine's
replay limit and flow control), and a failed connect is reported as an UNREACHABLE reset, so
the engine tries the next node: a request that never reached a node is always safe to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from typing import cast

from pico.gossip.seal import Keyring
from pico.http.channel import Channel, ChannelReceiver, ResetReason, UpstreamUnavailable
from pico.server.cluster import NodeInfo
from pico.tls import PeerTls, client_context

# Bounds the TCP connect to another node (a dead node must not stall the request for long).
_CONNECT_TIMEOUT = 3.0
# Idle connections kept per node, and how long one may sit idle (the peer's idle timeout is
# much longer, so a pooled connection is almost never closed under us).
_POOL_SIZE = 64
# Request bytes held while the connection is being set up, before the client is paused.
_PENDING_LIMIT = 256 * 1024
_POOL_IDLE = 30.0
# struct linger {l_onoff = 1, l_linger = 0}: close() resets the connection.
_LINGER_RESET = struct.pack("ii", 1, 0)
# Linux's IP_BIND_ADDRESS_NO_PORT (the socket module names it from Python 3.12 only).
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class TcpChannel(asyncio.Protocol):
    """A channel over a TCP connection to another node's proxy port."""

    def __init__(
        self, host: str, port: int, tls: PeerTls | None = None, source: str | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.source = source  # the local address to connect from (None: the kernel's choice)
        self.receiver: ChannelReceiver | None = None
        self.transport: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._pending_paused = False
        self._eof_pending = False
        self._closed = False
        self._paused = False
        self._connect: asyncio.Task[None] | None = None

    def connect(self) -> None:
        """Start connecting in the background."""
        self._connect = asyncio.get_running_loop().create_task(self._dial())

    async def _dial(self) -> None:
        try:
            # The TLS handshake counts as connecting: a node we cannot verify is not reached
            # (ssl.SSLError is an OSError), and the request goes to the next one.
            await asyncio.wait_for(self._open(), _CONNECT_TIMEOUT)
        except (OSError, TimeoutError):
            self._fail(ResetReason.UNREACHABLE)

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        tls = self.tls
        context = tls.context if tls is not None else None
        hostname = tls.hostname(self.host) if tls is not None else None
        if self.source is None:
            await loop.create_connection(
                lambda: self, self.host, self.port, ssl=context, server_hostname=hostname
            )
            return
        sock = await connect_from(self.source, self.host, self.port)
        try:
            await loop.create_connection(
                lambda: self, sock=sock, ssl=context, server_hostname=hostname
            )
        except BaseException:
            sock.close()
            raise

    def _fail(self, reason: ResetReason) -> None:
        if self._closed:
            return
        self._closed = True
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.connection_lost(reason)

    # -- Channel ---------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def set_receiver(self, receiver: ChannelReceiver) -> None:
        self.receiver = receiver

    def write(self, data: bytes | memoryview) -> None:
        if self._closed:
            return
        if self.transport is None:
            self._pending.append(bytes(data))
            self._pending_size += len(data)
            if self._pending_size > _PENDING_LIMIT and self.receiver is not None:
                self._pending_paused = True
                self.receiver.pause_writing()  # hold the client until the connection is up
        else:
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is None:
            self._eof_pending = True
        elif self.transport.can_write_eof():
            self.transport.write_eof()

    def reset(self, reason: ResetReason = ResetReason.CANCELLED) -> None:
        if self._closed:
            return
        self._closed = True
        self.receiver = None
        if self._connect is not None and not self._connect.done():
            self._connect.cancel()
        if self.transport is not None:
            if reason == ResetReason.NORMAL:
                self.transport.close()
            else:
                # A reset, not a FIN: the other node would take a FIN for a client that
                # half-closed and still waits for its answer, and keep the service working.
                _reset_on_close(self.transport)
                self.transport.abort()

    def pause_reading(self) -> None:
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        if self.transport is not None:
            self.transport.resume_reading()

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        if self._closed:
            t.abort()
            return
        pending, self._pending = self._pending, []
        if pending:
            t.write(b"".join(pending))
        self._pending_size = 0
        if self._pending_paused:
            self._pending_paused = False
            if self.receiver is not None:
                self.receiver.resume_writing()
        if self._eof_pending and t.can_write_eof():
            t.write_eof()
        if self._paused:
            t.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self.receiver is not None:
            self.receiver.data_received(data)

    def eof_received(self) -> bool:
        if self.receiver is not None:
            self.receiver.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._closed:
            return
        self._closed = True
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            # The connection was up: the request may have reached the node, so this is not a
            # dial failure (which proves it undelivered). It collapsed under the request (the
            # node died, or dropped it): GOING_AWAY, which only idempotent requests survive.
            receiver.connection_lost(None if exc is None else ResetReason.GOING_AWAY)

    def pause_writing(self) -> None:
        if self.receiver is not None:
            self.receiver.pause_writing()

    def resume_writing(self) -> None:
        if self.receiver is not None:
            self.receiver.resume_writing()


class _Idle:
    """Receiver of a pooled connection: any sign of life from the peer retires it."""

    __slots__ = ("channel", "pool")

    def __init__(self, pool: NodeUpstream, channel: TcpChannel) -> None:
        self.pool = pool
        self.channel = channel

    def data_received(self, data: bytes | memoryview) -> None:
        self.pool.discard(self.channel)
        self.channel.reset(ResetReason.NORMAL)

    def eof_received(self) -> None:
        self.pool.discard(self.channel)
        self.channel.reset(ResetReason.NORMAL)

    def connection_lost(self, reason: ResetReason | None) -> None:
        self.pool.discard(self.channel)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


class NodeUpstream:
    """Another node, as an upstream for requests this node forwards to it."""

    remote = True

    def __init__(
        self, node_id: str, proxy_addr: str, tls: PeerTls | None = None, source: str = ""
    ) -> None:
        self.node_id = node_id
        self.proxy_addr = proxy_addr
        self.tls = tls
        host, _, port = proxy_addr.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.source = _source_for(self.host, source)
        self._idle: list[tuple[float, TcpChannel]] = []

    @property
    def label(self) -> str:
        return self.node_id

    def open_channel(self, fresh: bool = False) -> tuple[Channel, bool]:
        now = time.monotonic()
        while self._idle and not fresh:
            since, channel = self._idle.pop()
            if channel.closed:
                continue
            if now - since > _POOL_IDLE:
                channel.reset(ResetReason.NORMAL)
                continue
            return channel, True
        if self.port <= 0:
            raise UpstreamUnavailable(f"node {self.node_id} has no proxy address")
        channel = TcpChannel(self.host, self.port, self.tls, self.source)
        channel.connect()
        return channel, False

    def release_channel(self, channel: Channel) -> None:
        assert isinstance(channel, TcpChannel)
        if len(self._idle) >= _POOL_SIZE:
            channel.reset(ResetReason.NORMAL)
            return
        channel.set_receiver(_Idle(self, channel))
        self._idle.append((time.monotonic(), channel))

    def discard(self, channel: TcpChannel) -> None:
        self._idle = [(t, c) for t, c in self._idle if c is not channel]

    def close(self) -> None:
        """Close every pooled connection."""
        idle, self._idle = self._idle, []
        for _, channel in idle:
            channel.reset(ResetReason.NORMAL)


class NodeUpstreams:
    """One `NodeUpstream` per remote node, created on first use.

    `node_of` gives what gossip told about a node (None if unknown); `tls` is how to reach
    the nodes whose proxy port speaks TLS (None: this node has no `cluster.tls`, and connects
    with the system's trust roots).
    """

    def __init__(
        self, node_of: Callable[[str], NodeInfo | None], tls: PeerTls | None = None
    ) -> None:
        self._node_of = node_of
        self._tls = tls or PeerTls(client_context())
        self._nodes: dict[str, NodeUpstream] = {}
        # The address this node's proxy port advertises, when connections can be made from it:
        # without gossip keys the other nodes trust a forwarded request by its source address.
        self.source = ""

    def get(self, node_id: str) -> NodeUpstream | None:
        """The upstream of `node_id`, or None if its proxy address is unknown."""
        node = self._node_of(node_id)
        if node is None or not node.proxy_addr:
            return None
        addr = node.proxy_addr
        upstream = self._nodes.get(node_id)
        if upstream is None or upstream.proxy_addr != addr:
            if upstream is not None:
                upstream.close()
            tls = self._tls if "proxy" in node.tls else None
            with contextlib.suppress(ValueError):
                upstream = self._nodes[node_id] = NodeUpstream(node_id, addr, tls, self.source)
        return upstream

    def forget(self, node_id: str) -> None:
        """Drop a node that left or expired."""
        upstream = self._nodes.pop(node_id, None)
        if upstream is not None:
            upstream.close()

    def close(self) -> None:
        """Close every pool."""
        for node_id in list(self._nodes):
            self.forget(node_id)


class MemberProof:
    """`ForwardProof` over the cluster's gossip keyring: an HMAC of (node, time, method,
    target) with a key derived from the gossip key; valid for 30 s."""

    def __init__(self, keyring: Keyring, clock: Callable[[], float] = time.time) -> None:
        self.keyring = keyring
        self.clock = clock

    def mark(self, method: bytes, target: bytes) -> bytes:
        return self.keyring.forward_mark(method, target, self.clock())

    def verify(self, value: bytes, method: bytes, target: bytes) -> bool:
        return self.keyring.forwarded_by_member(value, method, target, self.clock())


def _reset_on_close(transport: asyncio.Transport) -> None:
    """Make closing the connection send an RST (SO_LINGER with a zero timeout)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _source_for(host: str, source: str) -> str | None:
    """`source` if connections to `host` can come from it: both literal IPs of one family."""
    try:
        same_family = ipaddress.ip_address(host).version == ipaddress.ip_address(source).version
    except ValueError:
        return None  # a name, or no source: the kernel picks the address
    return source if same_family else None


def bindable_source(host: str) -> str:
    """`host` if this machine can connect from it (a literal, specific, local IP), else ""."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return ""
    if ip.is_unspecified:
        return ""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, 0))
        except OSError:
            return ""  # not one of ours (a NAT's public address, say)
    return host


async def connect_from(source: str, host: str, port: int) -> socket.socket:
    """A TCP connection to host:port from the local address `source` (a literal IP).

    The port is picked at connect time, as for any connection (IP_BIND_ADDRESS_NO_PORT), not
    when binding: a node forwarding a lot does not run out of ports for `source`."""
    family = socket.AF_INET6 if ipaddress.ip_address(source).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # not Linux: the port is picked when binding
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock
