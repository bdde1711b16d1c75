"""Upstream tunnels: the WebSocket route agents connect to, and the registry of endpoints.

`GET /pico/v1/upstream/{endpoint_id}` upgrades to a WebSocket that carries one mux `Tunnel`.
The `EndpointRegistry` keeps the tunnels of each endpoint in connection order and hands them out
round-robin; a tunnel leaves the registry the moment it closes, fails its pings, or sends GoAway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from aiohttp import web

from pico import log
from pico.http.channel import Channel, ResetReason, Upstream, UpstreamUnavailable
from pico.http.head import valid_endpoint_id
from pico.mux.session import MuxError
from pico.mux.tunnel import MAX_MESSAGE_SIZE, MuxStream, Tunnel

_log = log.get_logger("upstream")

# Idle keep-alive streams kept per tunnel, and how long one may sit idle before we drop it
# (each one holds a TCP connection from the agent to the service).
_POOL_SIZE = 64
_POOL_IDLE = 30.0


class TunnelUpstream:
    """A connected agent tunnel as an `Upstream`, with a pool of idle keep-alive streams."""

    remote = False

    def __init__(self, endpoint_id: str, tunnel: Tunnel, addr: str) -> None:
        self.endpoint_id = endpoint_id
        self.tunnel = tunnel
        self.addr = addr
        self.connected_at = time.time()
        self._idle: list[tuple[float, MuxStream]] = []

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
        try:
            return self.tunnel.open_stream(), False
        except MuxError as exc:
            raise UpstreamUnavailable(str(exc)) from exc

    def release_channel(self, channel: Channel) -> None:
        """Keep a finished stream for the next request, if the pool has room."""
        assert isinstance(channel, MuxStream)
        if len(self._idle) >= _POOL_SIZE or not self.tunnel.usable:
            channel.reset(ResetReason.NORMAL)
            return
        channel.set_receiver(_IdleStream(self, channel))
        self._idle.append((time.monotonic(), channel))

    def discard(self, stream: MuxStream) -> None:
        """Forget an idle stream that the service closed."""
        self._idle = [(t, s) for t, s in self._idle if s is not stream]

    def close_idle(self) -> None:
        """Reset every idle stream (the tunnel is going away)."""
        idle, self._idle = self._idle, []
        for _, stream in idle:
            stream.reset(ResetReason.NORMAL)


class _IdleStream:
    """Receiver of a pooled stream: any sign of life from the service retires it."""

    __slots__ = ("stream", "upstream")

    def __init__(self, upstream: TunnelUpstream, stream: MuxStream) -> None:
        self.upstream = upstream
        self.stream = stream

    def data_received(self, data: bytes) -> None:
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
    """Local upstreams by endpoint, load balanced round-robin."""

    def __init__(self) -> None:
        self._endpoints: dict[str, list[TunnelUpstream]] = {}
        self._next: dict[str, int] = {}
        self.listeners: list[Callable[[str, int], None]] = []

    def add(self, upstream: TunnelUpstream) -> None:
        """Register a connected tunnel."""
        ups = self._endpoints.setdefault(upstream.endpoint_id, [])
        ups.append(upstream)
        self._notify(upstream.endpoint_id, len(ups))

    def remove(self, upstream: TunnelUpstream) -> bool:
        """Unregister a tunnel; returns False if it was not registered (idempotent)."""
        ups = self._endpoints.get(upstream.endpoint_id)
        if ups is None or upstream not in ups:
            return False
        ups.remove(upstream)
        count = len(ups)
        if not ups:
            del self._endpoints[upstream.endpoint_id]
            self._next.pop(upstream.endpoint_id, None)
        self._notify(upstream.endpoint_id, count)
        return True

    def _notify(self, endpoint_id: str, count: int) -> None:
        for listener in self.listeners:
            listener(endpoint_id, count)

    def candidates(self, endpoint_id: str) -> list[Upstream]:
        """The endpoint's usable tunnels, starting at the round-robin position."""
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
        """A snapshot: endpoint id → its tunnels."""
        return {k: list(v) for k, v in self._endpoints.items()}

    def counts(self) -> dict[str, int]:
        """Endpoint id → number of connected tunnels."""
        return {k: len(v) for k, v in self._endpoints.items()}

    def all(self) -> list[TunnelUpstream]:
        """Every registered tunnel."""
        return [u for ups in self._endpoints.values() for u in ups]


class UpstreamServer:
    """The upstream port: accepts agent WebSockets and keeps the registry current."""

    def __init__(
        self,
        registry: EndpointRegistry,
        *,
        ping_interval: float = 15.0,
        ping_timeout: float = 15.0,
        on_connect: Callable[[str], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
    ) -> None:
        self.registry = registry
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.accepting = True
        self._tunnels: set[TunnelUpstream] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def app(self) -> web.Application:
        """The aiohttp application serving the upstream route."""
        app = web.Application(handler_args={"max_field_size": 16384})
        app.router.add_get("/pico/v1/upstream/{endpoint_id}", self.handle)
        app.router.add_route("*", "/{tail:.*}", _not_found)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Upgrade an agent's request to a tunnel and serve it until it closes."""
        endpoint_id = request.match_info["endpoint_id"]
        if not valid_endpoint_id(endpoint_id):
            return _json_error(400, "invalid endpoint id: use 1-128 characters of [A-Za-z0-9._-]")
        if not self.accepting:
            return _json_error(503, "node shutting down")
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_SIZE, autoping=True, compress=False)
        if not ws.can_prepare(request).ok:
            return _json_error(400, "expected a WebSocket upgrade")
        await ws.prepare(request)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        addr = f"{peer[0]}:{peer[1]}" if peer else "unknown"
        tunnel = Tunnel(
            ws,
            client=False,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            name=f"{endpoint_id}@{addr}",
        )
        upstream = TunnelUpstream(endpoint_id, tunnel, addr)

        def on_goaway() -> None:
            # The agent is stopping: route new requests elsewhere at once.
            self.registry.remove(upstream)
            upstream.close_idle()

        tunnel.on_goaway = on_goaway
        self.registry.add(upstream)
        self._tunnels.add(upstream)
        _log.info("upstream connected", endpoint_id=endpoint_id, client_ip=addr)
        if self.on_connect:
            self.on_connect(endpoint_id)
        try:
            await tunnel.run()
        finally:
            self.registry.remove(upstream)
            self._tunnels.discard(upstream)
            _log.info(
                "upstream disconnected",
                endpoint_id=endpoint_id,
                client_ip=addr,
                reason=tunnel.close_reason,
            )
            if self.on_disconnect:
                self.on_disconnect(endpoint_id)
        return ws

    def tunnels(self) -> Sequence[TunnelUpstream]:
        """Every open tunnel."""
        return list(self._tunnels)

    async def close_all(self, drain: float) -> None:
        """Stop accepting, send GoAway on every tunnel, let streams finish for `drain` s, close."""
        self.accepting = False
        for up in list(self._tunnels):
            self.registry.remove(up)
            up.close_idle()
        await asyncio.gather(
            *(up.tunnel.drain_and_close(drain) for up in list(self._tunnels)),
            return_exceptions=True,
        )


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _not_found(request: web.Request) -> web.StreamResponse:
    return _json_error(404, "not found")
