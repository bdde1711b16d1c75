"""Upstream tunnels: the WebSocket route agents connect to, and the registry of endpoints.

`GET /pico/v1/upstream/{endpoint_id}` upgrades to a WebSocket that carries one mux `Tunnel`.
The `EndpointRegistry` keeps the tunnels of each endpoint in connection order and hands them out
round-robin; a tunnel leaves the registry the moment it closes, fails its pings, or sends GoAway.
`TunnelLimits` bounds what agents may make the node hold (tunnels, streams, connections per
address, control frames); each refusal is a clear answer, a count by limit and a throttled log.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from pico import log
from pico.auth import Token, TokenVerifier
from pico.http.channel import Channel, ResetReason, Upstream, UpstreamBusy, UpstreamUnavailable
from pico.http.head import endpoint_key
from pico.http.settings import AddressLimit
from pico.mux.session import MuxError
from pico.mux.stream import MuxStream
from pico.mux.tunnel import DEFAULT_MAX_CONTROL_FRAMES, Tunnel
from pico.mux.upgrade import Accepted, Rejected, ServerHandshake, accept_response, reject_response
from pico.server.tcp import TcpObserver, WebSocketBridge

_log = log.get_logger("upstream")

# Idle keep-alive streams kept per tunnel, and how long one may sit idle before we drop it
# (each one holds a TCP connection from the agent to the service).
_POOL_SIZE = 64
_POOL_IDLE = 30.0

# The names `on_limit` reports (the label of `pico_limit_rejections_total`): config keys.
LIMIT_TUNNELS = "upstream.max_tunnels"
LIMIT_TUNNELS_PER_ENDPOINT = "upstream.max_tunnels_per_endpoint"
LIMIT_STREAMS = "upstream.max_streams_per_tunnel"
LIMIT_CONNECTIONS_PER_IP = "upstream.max_connections_per_ip"
LIMIT_CONTROL_FRAMES = "upstream.max_control_frames"
LIMIT_AGENT_STREAMS = "upstream.agent_opened_streams"  # agents may open none
# What the tunnel reports, as the names above.
_TUNNEL_LIMITS = {"control_frames": LIMIT_CONTROL_FRAMES, "accept_streams": LIMIT_AGENT_STREAMS}


@dataclass(frozen=True, slots=True)
class TunnelLimits:
    """What agents may make this node hold (the `upstream.*` keys of the same names)."""

    max_tunnels: int = 10_000
    max_tunnels_per_endpoint: int = 256
    max_streams_per_tunnel: int = 1024
    max_connections_per_ip: int = 1024  # 0: no limit
    max_control_frames: int = DEFAULT_MAX_CONTROL_FRAMES
    # A stream the agent leaves unacknowledged this long while silent is reset (0: never).
    stream_ack_timeout: float = 2.0


class TunnelUpstream:
    """A connected agent tunnel as an `Upstream`, with a pool of idle keep-alive streams.

    A tunnel of a TCP endpoint (`protocol` "tcp") hands out each stream behind a
    `WebSocketBridge` (pico.server.tcp), and never pools one.
    """

    remote = False

    def __init__(
        self,
        endpoint_id: str,
        tunnel: Tunnel,
        addr: str,
        protocol: str = "http",
        tcp_observer: TcpObserver | None = None,
        *,
        max_streams: int = 1024,
        on_limit: Callable[[str], None] | None = None,
    ) -> None:
        self.endpoint_id = endpoint_id
        self.tunnel = tunnel
        self.addr = addr
        self.protocol = protocol
        self.tcp_observer = tcp_observer
        self.max_streams = max_streams
        self.on_limit = on_limit
        self.counted_ip: str | None = None  # its connection's slot in the per-IP limit
        self.connected_at = time.time()
        self.graceful = False  # the agent said goodbye (GoAway) before the tunnel closed
        self.expiry: asyncio.TimerHandle | None = None  # when its token expires
        self._idle: list[tuple[float, MuxStream]] = []
        self._pool_closed = False

    @property
    def label(self) -> str:
        return self.addr

    def open_channel(self, fresh: bool = False) -> tuple[Channel, bool]:
        """A pooled idle stream if one is fresh enough, else a new stream."""
        now = time.monotonic()
        while self._idle and not fresh:
            since, stream = self._idle.pop()
            if stream.closed:
                continue
            if now - since > _POOL_IDLE:
                stream.reset(ResetReason.NORMAL)
                continue
            return stream, True
        if not self.tunnel.usable:
            raise UpstreamUnavailable("tunnel closing")
        if self.tunnel.session.stream_count >= self.max_streams:
            if not self._idle:
                if self.on_limit is not None:
                    self.on_limit(LIMIT_STREAMS)
                raise UpstreamBusy(f"tunnel has {self.max_streams} streams open")
            # An idle keep-alive stream makes room: the oldest.
            self._idle.pop(0)[1].reset(ResetReason.NORMAL)
        try:
            stream = self.tunnel.open_stream()
        except MuxError as exc:
            raise UpstreamUnavailable(str(exc)) from exc
        if self.protocol == "tcp":
            return WebSocketBridge(stream, self.endpoint_id, self.tcp_observer), False
        return stream, False

    def release_channel(self, channel: Channel) -> None:
        """Keep a finished stream for the next request, if the pool has room."""
        if not isinstance(channel, MuxStream):
            channel.reset(ResetReason.NORMAL)  # a TCP connection's bridge: never reused
            return
        if len(self._idle) >= _POOL_SIZE or not self.tunnel.usable or self._pool_closed:
            channel.reset(ResetReason.NORMAL)
            return
        channel.set_receiver(_IdleStream(self, channel))
        self._idle.append((time.monotonic(), channel))

    @property
    def idle_count(self) -> int:
        """Streams waiting in the keep-alive pool."""
        return len(self._idle)

    def discard(self, stream: MuxStream) -> None:
        """Forget an idle stream that the service closed."""
        self._idle = [(t, s) for t, s in self._idle if s is not stream]

    def close_idle(self) -> None:
        """Reset every idle stream, and every stream released from now on (the tunnel is
        going away: a stream pooled after this would keep its drain waiting to the end)."""
        self._pool_closed = True
        idle, self._idle = self._idle, []
        for _, stream in idle:
            stream.reset(ResetReason.NORMAL)


class _IdleStream:
    """Receiver of a pooled stream: any sign of life from the service retires it."""

    __slots__ = ("stream", "upstream")

    def __init__(self, upstream: TunnelUpstream, stream: MuxStream) -> None:
        self.upstream = upstream
        self.stream = stream

    def data_received(self, data: bytes | memoryview) -> None:
        # Unsolicited bytes from an idle service connection: it cannot be reused safely.
        self.upstream.discard(self.stream)
        self.stream.reset(ResetReason.NORMAL)

    def eof_received(self) -> None:
        self.upstream.discard(self.stream)
        self.stream.reset(ResetReason.NORMAL)

    def connection_lost(self, reason: ResetReason | None) -> None:
        self.upstream.discard(self.stream)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


class EndpointRegistry:
    """Local upstreams by endpoint, load balanced round-robin.

    Endpoints are keyed by `endpoint_key()`: ids that differ only in ASCII case are one
    endpoint, and their tunnels are balanced together. Each tunnel keeps its id as registered.
    """

    def __init__(self) -> None:
        self._endpoints: dict[str, list[TunnelUpstream]] = {}
        self._next: dict[str, int] = {}
        self.listeners: list[Callable[[str, int], None]] = []

    def add(self, upstream: TunnelUpstream) -> None:
        """Register a connected tunnel."""
        key = endpoint_key(upstream.endpoint_id)
        ups = self._endpoints.setdefault(key, [])
        ups.append(upstream)
        self._notify(key, len(ups))

    def remove(self, upstream: TunnelUpstream) -> bool:
        """Unregister a tunnel; returns False if it was not registered (idempotent)."""
        key = endpoint_key(upstream.endpoint_id)
        ups = self._endpoints.get(key)
        if ups is None or upstream not in ups:
            return False
        ups.remove(upstream)
        count = len(ups)
        if not ups:
            del self._endpoints[key]
            self._next.pop(key, None)
        self._notify(key, count)
        return True

    def _notify(self, key: str, count: int) -> None:
        for listener in self.listeners:
            listener(key, count)

    def count(self, endpoint_id: str) -> int:
        """Registered tunnels of the endpoint (any case of its id)."""
        return len(self._endpoints.get(endpoint_key(endpoint_id), ()))

    def candidates(self, endpoint_id: str) -> list[Upstream]:
        """The endpoint's usable tunnels, starting at the round-robin position.

        `endpoint_id` is a routing key (requests fold their endpoint's case at the edge).
        """
        ups = self._endpoints.get(endpoint_id)
        if not ups:
            return []
        n = len(ups)
        i = self._next.get(endpoint_id, 0) % n
        self._next[endpoint_id] = (i + 1) % n
        if n == 1:
            return [ups[0]] if ups[0].tunnel.usable else []
        return [u for u in ups[i:] + ups[:i] if u.tunnel.usable]

    def endpoints(self) -> dict[str, list[TunnelUpstream]]:
        """A snapshot: endpoint key → its tunnels."""
        return {k: list(v) for k, v in self._endpoints.items()}

    def protocol_of(self, endpoint_id: str) -> str | None:
        """How the endpoint is served here (http or tcp), or None without a local tunnel.

        One node serves an endpoint as one protocol: the upgrade of a tunnel that says
        otherwise is refused (409, pico.mux.upgrade)."""
        ups = self._endpoints.get(endpoint_key(endpoint_id))
        return ups[0].protocol if ups else None

    def counts(self) -> dict[str, int]:
        """Endpoint key → number of connected tunnels (what gossip publishes)."""
        return {k: len(v) for k, v in self._endpoints.items()}

    def all(self) -> list[TunnelUpstream]:
        """Every registered tunnel."""
        return [u for ups in self._endpoints.values() for u in ups]


class UpstreamServer:
    """The upstream port: accepts agent WebSockets and keeps the registry current.

    A raw asyncio server: the upgrade request is checked by `pico.mux.upgrade.ServerHandshake`,
    answered with a JSON error or a 101, and the connection is then handed to a `Tunnel` (no
    HTTP framework on the data path).
    """

    def __init__(
        self,
        registry: EndpointRegistry,
        *,
        auth: TokenVerifier | None = None,
        disconnect_on_expiry: bool = True,
        ping_interval: float = 5.0,
        ping_timeout: float = 5.0,
        limits: TunnelLimits | None = None,
        on_connect: Callable[[str], None] | None = None,
        on_disconnect: Callable[[str, bool], None] | None = None,
        on_limit: Callable[[str], None] | None = None,
        tcp_observer: TcpObserver | None = None,
    ) -> None:
        self.registry = registry
        self.tcp_observer = tcp_observer
        self.limits = limits = limits if limits is not None else TunnelLimits()
        # Told the name of each limit an agent hit (a metric).
        self.on_limit = on_limit
        self.per_ip = AddressLimit(limits.max_connections_per_ip)
        # With `auth`, an agent needs a token that permits the endpoint it registers; its
        # tunnel is drained when the token expires unless `disconnect_on_expiry` is off.
        self.auth = auth
        self.disconnect_on_expiry = disconnect_on_expiry
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.accepting = True
        self._server: asyncio.Server | None = None
        self._tunnels: set[TunnelUpstream] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Bind (host, port), over TLS with `tls`, without accepting yet (`serve()` starts);
        returns the bound port. Raises OSError."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _UpgradeRequest(self),
            host or None,
            port,
            reuse_address=True,
            backlog=1024,
            start_serving=False,
            ssl=tls,
            ssl_handshake_timeout=_HEAD_TIMEOUT if tls is not None else None,
        )
        # Any: uvloop's servers hold a list of sockets where the stubs declare a tuple (which
        # the compiled module would check).
        server: Any = self._server
        return int(server.sockets[0].getsockname()[1])

    async def serve(self) -> None:
        """Start accepting agents on the port `start()` bound."""
        if self._server is not None:
            await self._server.start_serving()

    def accept(
        self,
        endpoint_id: str,
        transport: asyncio.BaseTransport,
        rest: bytes,
        token: Token | None = None,
        protocol: str = "http",
        counted_ip: str | None = None,
    ) -> None:
        """Serve an upgraded connection as the tunnel of `endpoint_id` (with its `token`),
        served to clients as `protocol` (http or tcp).

        `counted_ip`: the address `per_ip` counted this connection for (released at the end).
        """
        limits = self.limits
        tunnel = Tunnel(
            client=False,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            max_control_frames=limits.max_control_frames,
            ack_timeout=limits.stream_ack_timeout,
            on_limit=lambda name: self.limit_hit(_TUNNEL_LIMITS.get(name, name)),
        )
        tunnel.attach(transport, b"")
        addr = tunnel.peer or "unknown"
        tunnel.name = f"{endpoint_id}@{addr}"
        upstream = TunnelUpstream(
            endpoint_id,
            tunnel,
            addr,
            protocol,
            self.tcp_observer,
            max_streams=limits.max_streams_per_tunnel,
            on_limit=self.limit_hit,
        )
        upstream.counted_ip = counted_ip

        def on_goaway() -> None:
            # The agent is stopping: route new requests elsewhere at once.
            upstream.graceful = True
            self.registry.remove(upstream)
            upstream.close_idle()

        tunnel.on_goaway = on_goaway
        self.registry.add(upstream)
        self._tunnels.add(upstream)
        _log.info("upstream connected", endpoint_id=endpoint_id, client_ip=addr, protocol=protocol)
        if self.on_connect:
            self.on_connect(endpoint_key(endpoint_id))
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._serve(upstream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if token is not None and token.expires is not None and self.disconnect_on_expiry:
            delay = max(0.0, token.expires - time.time())
            upstream.expiry = loop.call_later(delay, self._expired, upstream)
        if rest:
            tunnel.data_received(rest)

    def admit(self, endpoint_id: str) -> Rejected | None:
        """Why a new tunnel for `endpoint_id` is refused now (the node or the endpoint is at
        its limit), or None."""
        limits = self.limits
        if len(self._tunnels) >= limits.max_tunnels:
            self.limit_hit(LIMIT_TUNNELS)
            return Rejected(503, f"node is at upstream.max_tunnels ({limits.max_tunnels} tunnels)")
        if self.registry.count(endpoint_id) >= limits.max_tunnels_per_endpoint:
            self.limit_hit(LIMIT_TUNNELS_PER_ENDPOINT)
            return Rejected(
                429,
                f"endpoint {endpoint_id} is at upstream.max_tunnels_per_endpoint "
                f"({limits.max_tunnels_per_endpoint} tunnels)",
            )
        return None

    def limit_hit(self, limit: str) -> None:
        """Count a refusal for `limit` and log it (at most once a minute per limit)."""
        if self.on_limit is not None:
            self.on_limit(limit)
        _log.warn_throttled("upstream limit reached: " + limit)

    def _expired(self, upstream: TunnelUpstream) -> None:
        """The agent's token expired: no new requests, GoAway, and the open ones finish."""
        upstream.expiry = None
        _log.info(
            "upstream token expired", endpoint_id=upstream.endpoint_id, client_ip=upstream.addr
        )
        self.registry.remove(upstream)
        upstream.close_idle()
        upstream.tunnel.close_reason = "upstream token expired"
        task = asyncio.get_running_loop().create_task(
            upstream.tunnel.drain_and_close(_EXPIRY_DRAIN)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, upstream: TunnelUpstream) -> None:
        try:
            await upstream.tunnel.run()
        finally:
            if upstream.expiry is not None:
                upstream.expiry.cancel()
                upstream.expiry = None
            self.registry.remove(upstream)
            upstream.close_idle()
            self._tunnels.discard(upstream)
            if upstream.counted_ip is not None:
                self.per_ip.remove(upstream.counted_ip)
            _log.info(
                "upstream disconnected",
                endpoint_id=upstream.endpoint_id,
                client_ip=upstream.addr,
                reason=upstream.tunnel.close_reason,
            )
            if self.on_disconnect:
                self.on_disconnect(endpoint_key(upstream.endpoint_id), upstream.graceful)

    def tunnels(self) -> Sequence[TunnelUpstream]:
        """Every open tunnel."""
        return list(self._tunnels)

    async def close_all(self, drain: float) -> None:
        """Stop accepting, send GoAway on every tunnel, let streams finish for `drain` s, close."""
        self.accepting = False
        if self._server is not None:
            self._server.close()
        for up in list(self._tunnels):
            self.registry.remove(up)
            up.close_idle()
        await asyncio.gather(
            *(up.tunnel.drain_and_close(drain) for up in list(self._tunnels)),
            return_exceptions=True,
        )

    async def close(self) -> None:
        """Close the listener and every tunnel at once."""
        self.accepting = False
        if self._server is not None:
            self._server.close()
        for up in list(self._tunnels):
            up.tunnel.close("node stopped")
        await asyncio.gather(*self._tasks, return_exceptions=True)


# The upgrade request must arrive quickly (its size is bounded by the `ServerHandshake`):
# this port faces the internet.
_HEAD_TIMEOUT = 10.0
# A tunnel whose token expired has this long to finish its open streams.
_EXPIRY_DRAIN = 10.0


class _UpgradeRequest(asyncio.Protocol):
    """Feeds one upgrade request to a `ServerHandshake`; answers its error, or hands the
    connection to a tunnel."""

    def __init__(self, server: UpstreamServer) -> None:
        self.server = server
        self.handshake = ServerHandshake(
            server.auth.check if server.auth is not None else None,
            accepting=lambda: server.accepting,
            protocol_of=server.registry.protocol_of,
        )
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.ip = ""
        # Counted in `server.per_ip` (until the connection or its tunnel closes); when the
        # address is over its limit, not counted and refused once its request is in.
        self.counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.timer = asyncio.get_running_loop().call_later(_HEAD_TIMEOUT, self._timeout)
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else ""
        self.counted = self.server.per_ip.add(self.ip)

    def _timeout(self) -> None:
        self._reject(Rejected(408, "request head not received in time"))

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        match self.handshake.receive_data(data):
            case Accepted(endpoint_id, key, token, rest, protocol):
                refusal = self._refusal(endpoint_id)
                if refusal is not None:
                    self._reject(refusal)
                    return
                transport, self.transport = self.transport, None
                self._stop_timer()
                self.counted = False  # the tunnel's now: released when it closes
                transport.write(accept_response(key))
                self.server.accept(
                    endpoint_id, transport, rest, token, protocol, counted_ip=self.ip
                )
            case Rejected() as rejected:
                self._reject(rejected)
            case None:
                pass

    def _refusal(self, endpoint_id: str) -> Rejected | None:
        if not self.counted:
            server = self.server
            server.limit_hit(LIMIT_CONNECTIONS_PER_IP)
            return Rejected(
                429,
                f"too many connections from {self.ip} "
                f"(upstream.max_connections_per_ip is {server.limits.max_connections_per_ip})",
            )
        return self.server.admit(endpoint_id)

    def _reject(self, rejected: Rejected) -> None:
        self._stop_timer()
        self._uncount()
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.write(reject_response(rejected))
            transport.close()

    def _uncount(self) -> None:
        if self.counted:
            self.counted = False
            self.server.per_ip.remove(self.ip)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        self._uncount()
        self.transport = None
