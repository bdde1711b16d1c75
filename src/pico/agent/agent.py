"""The agent: one tunnel per endpoint, each stream connected to the service by its `Dialer`.

The agent never parses HTTP: bytes pass through unchanged, so WebSocket, SSE and anything else
work (a TCP service's connection is spliced; see pico.agent.dialer for the others). It
reconnects forever with full-jitter exponential backoff on network errors and 5xx, and stops
with a clear message when the server rejects it (400, 401, 403).
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from pico import log
from pico.agent.dialer import Dialer, dialer_for
from pico.config import AgentConfig, EndpointSpec
from pico.mux.frame import ResetReason
from pico.mux.handshake import HandshakeError, open_websocket
from pico.mux.stream import MuxStream
from pico.mux.tunnel import Tunnel
from pico.mux.upgrade import PROTOCOL_PARAM, UPSTREAM_PATH
from pico.tls import client_context
from pico.webapp import serve_app

_log = log.get_logger("agent")
_access = log.get_logger("agent.access")

# Reconnect backoff: full jitter over an exponential ceiling (0.5 s doubling to 30 s), so a
# fleet of agents that lost the same node does not reconnect in lockstep.
_BACKOFF_MIN = 0.5
_BACKOFF_MAX = 30.0
# Open streams get this long to finish after SIGTERM before the tunnel is closed.
_GRACE_PERIOD = 30.0
# Refusals that retrying will not fix. A 404 is not one: a reverse proxy in front of the
# cluster may answer it for a moment (then it is retried, and logged once with a hint).
_FATAL_STATUSES = (400, 401, 403)
_PORT_HINT = "is --server.url the upstream port (default 8001)?"
_HINTS = {
    400: _PORT_HINT,
    401: "does --auth.api-key hold a valid token for this cluster?",
    403: "does the token of --auth.api-key permit this endpoint (claim pico.endpoints)?",
    404: _PORT_HINT,
}
# Bounds connecting plus the WebSocket handshake to a node.
_CONNECT_TIMEOUT = 10.0
# What `pico_agent_limit_rejections_total` names a draining tunnel closed for the limit.
LIMIT_DRAINING = "max_draining_tunnels"


class AgentRejected(Exception):
    """The server refused the agent for a reason retrying will not fix."""


class AgentMetrics:
    """Per-endpoint agent metrics (endpoints are configured, so the labels are bounded)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connected = Gauge(
            "pico_agent_connected", "1 while the endpoint's tunnel is up.", ["endpoint"], registry=r
        )
        self.connects = Counter(
            "pico_agent_connects_total", "Tunnel connections made.", ["endpoint"], registry=r
        )
        self.streams = Counter(
            "pico_agent_streams_total", "Streams opened by the server.", ["endpoint"], registry=r
        )
        self.active_streams = Gauge(
            "pico_agent_active_streams", "Streams currently open.", ["endpoint"], registry=r
        )
        self.limit_rejections = Counter(
            "pico_agent_limit_rejections_total",
            "What the agent refused a node for, by limit: streams over max_streams "
            "(refused), the tunnel closed for a control frame flood, a draining tunnel closed "
            "over max_draining_tunnels, or (pico.sdk) requests over serve_wsgi's max_waiting "
            "(503) or a head over max_header_bytes (431).",
            ["endpoint", "limit"],
            registry=r,
        )
        self.dial_errors = Counter(
            "pico_agent_dial_errors_total",
            "Failed connections to the local service, by reason.",
            ["endpoint", "reason"],
            registry=r,
        )


class EndpointLink:
    """Keeps one endpoint's tunnel up: connect, serve, reconnect.

    `connected` is set while a tunnel is up (the node has registered the endpoint).
    """

    def __init__(self, agent: Agent, spec: EndpointSpec, dialer: Dialer) -> None:
        self.agent = agent
        self.spec = spec
        self.dialer = dialer
        self.tunnel: Tunnel | None = None
        self.connected = asyncio.Event()
        self.stopping = False
        self._dials: set[asyncio.Task[None]] = set()
        # Tunnels of a node that sent GoAway, finishing their streams (oldest first: a dict
        # keeps the order), and their run() tasks.
        self._draining: dict[Tunnel, None] = {}
        self._runners: set[asyncio.Task[None]] = set()
        # Dial failures of this endpoint, logged at most once a minute per reason.
        self._dial_warnings = log.RateLimited(_log)
        base = agent.config.server.url.rstrip("/")
        # The endpoint path is appended to any path prefix of server.url (a reverse proxy
        # in front of the cluster may serve it under a prefix).
        ws_base = "ws" + base[4:] if base.startswith("http") else base
        self.url = f"{ws_base}{UPSTREAM_PATH}{spec.endpoint_id}"
        if spec.protocol != "http":
            # The node serves the endpoint as this protocol (pico.mux.upgrade checks it).
            self.url += f"?{PROTOCOL_PARAM}={spec.protocol}"

    async def run(self) -> None:
        """Connect and serve until stopped. Raises AgentRejected on a fatal refusal."""
        attempt = 0
        endpoint_id = self.spec.endpoint_id
        not_found_logged = False
        while not self.stopping:
            try:
                transport, rest = await open_websocket(
                    self.url,
                    self.agent.auth_headers,
                    timeout=_CONNECT_TIMEOUT,
                    ssl_context=self.agent.tls,
                )
            except HandshakeError as exc:
                hint = _HINTS.get(exc.status)
                if exc.status in _FATAL_STATUSES:
                    raise AgentRejected(
                        f"server rejected endpoint {endpoint_id!r}: {exc.status} {exc.message}"
                        + (f" ({hint})" if hint else "")
                    ) from exc
                if exc.status == 404:
                    if not not_found_logged:
                        not_found_logged = True
                        _log.error(
                            "server answered 404; retrying",
                            endpoint_id=endpoint_id,
                            url=self.url,
                            hint=hint,
                        )
                else:
                    _log.warn(
                        "connect failed",
                        endpoint_id=endpoint_id,
                        status=exc.status,
                        error=exc.message,
                    )
            except (OSError, TimeoutError) as err:
                _log.warn(
                    "connect failed", endpoint_id=endpoint_id, error=str(err) or type(err).__name__
                )
            else:
                attempt = 0
                not_found_logged = False
                if await self._serve(transport, rest):
                    continue  # the node is draining: reconnect at once (no backoff)
                if self.stopping:
                    return
            attempt += 1
            ceiling = min(_BACKOFF_MAX, _BACKOFF_MIN * 2 ** min(attempt - 1, 16))
            await asyncio.sleep(random.uniform(0, ceiling))

    async def _serve(self, transport: asyncio.Transport, rest: bytes) -> bool:
        """Run one tunnel. Returns True if the node sent GoAway (it is draining)."""
        m = self.agent.metrics
        endpoint_id = self.spec.endpoint_id
        tunnel = Tunnel(
            client=True,
            on_stream=self._on_stream,
            ping_interval=self.agent.config.server.heartbeat_interval,
            ping_timeout=self.agent.config.server.heartbeat_timeout,
            name=endpoint_id,
            random_mask=self.agent.config.server.mask_frames,
            # A node (maybe not ours) may not make the agent hold more service connections.
            max_streams=self.agent.config.max_streams,
            on_limit=self.limit_hit,
            # A TCP client is answered (101) only once its service connection is up: the
            # stream is acknowledged after the dial (ServiceSide), or reset with its failure,
            # which the node treats as any dial failure (another upstream, else 502/504).
            defer_acks=self.spec.protocol == "tcp",
        )
        moved = asyncio.Event()
        tunnel.on_goaway = moved.set
        tunnel.attach(transport, rest, resume=True, direct=True)
        self.tunnel = tunnel
        self.connected.set()
        m.connected.labels(endpoint_id).set(1)
        m.connects.labels(endpoint_id).inc()
        _log.info("connected", endpoint_id=endpoint_id, url=self.url, node=tunnel.peer)
        loop = asyncio.get_running_loop()
        runner = loop.create_task(tunnel.run())
        waiter = loop.create_task(moved.wait())
        try:
            await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if self.tunnel is tunnel:
                self.tunnel = None
                self.connected.clear()
            m.connected.labels(endpoint_id).set(0)
        if moved.is_set() and not runner.done() and not self.stopping:
            # Open streams finish on the old tunnel while a new one is opened (through the
            # load balancer, to another node): a node restart loses no requests.
            _log.info("server going away; reconnecting", endpoint_id=endpoint_id)
            self._draining[tunnel] = None
            runner.add_done_callback(lambda _: self._draining.pop(tunnel, None))
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
            self._bound_draining()
            return True
        await runner
        if not self.stopping:
            _log.warn(
                "disconnected; reconnecting", endpoint_id=endpoint_id, reason=tunnel.close_reason
            )
        return False

    def _bound_draining(self) -> None:
        """Close the oldest draining tunnels past max_draining_tunnels: a node that sends
        GoAway but never ends the tunnel (broken, or hostile) would otherwise make us keep
        one more tunnel, and up to max_streams service connections, per GoAway."""
        limit = self.agent.config.max_draining_tunnels
        while len(self._draining) > limit:
            oldest = next(iter(self._draining))
            del self._draining[oldest]
            self.limit_hit(LIMIT_DRAINING)
            oldest.close(f"still draining past max_draining_tunnels ({limit})")

    def limit_hit(self, limit: str) -> None:
        """Count what was refused for `limit` (the tunnel's, or an in-process service's)."""
        self.agent.metrics.limit_rejections.labels(self.spec.endpoint_id, limit).inc()
        if limit == LIMIT_DRAINING:
            _log.warn_throttled(
                "draining tunnel closed: max_draining_tunnels reached",
                endpoint_id=self.spec.endpoint_id,
                max_draining_tunnels=self.agent.config.max_draining_tunnels,
            )
        if limit == "max_streams":
            _log.warn_throttled(
                "stream refused: max_streams reached",
                endpoint_id=self.spec.endpoint_id,
                max_streams=self.agent.config.max_streams,
            )

    def _on_stream(self, stream: MuxStream) -> None:
        if self.stopping:
            stream.reset(ResetReason.REJECTED)  # never reached the service: the node retries
            return
        self.agent.metrics.streams.labels(self.spec.endpoint_id).inc()
        task = asyncio.get_running_loop().create_task(self._dial(stream))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _dial(self, stream: MuxStream) -> None:
        loop = asyncio.get_running_loop()
        spec = self.spec
        labels = self.agent.metrics
        active = labels.active_streams.labels(spec.endpoint_id)
        service = self.dialer.service
        timeout = self.agent.config.forwarder.timeout if spec.timeout is None else spec.timeout
        started = loop.time()

        def done() -> None:
            active.dec()
            if spec.access_log:
                _access.info(
                    "connection closed",
                    endpoint_id=spec.endpoint_id,
                    service=service,
                    duration=round(loop.time() - started, 3),
                )

        if stream.closed:
            return  # reset before we got to it: the node may send the request elsewhere
        try:
            await asyncio.wait_for(self.dialer.dial(stream, done), timeout)
            active.inc()
            if spec.access_log:
                _access.info("connection opened", endpoint_id=spec.endpoint_id, service=service)
        except TimeoutError:
            labels.dial_errors.labels(spec.endpoint_id, "timeout").inc()
            self._dial_failed("timeout", f"not connected within {timeout}s")
            stream.reset(ResetReason.TIMEOUT)
        except ConnectionRefusedError as refused:
            labels.dial_errors.labels(spec.endpoint_id, "refused").inc()
            self._dial_failed("refused", refused)
            stream.reset(ResetReason.REFUSED)
        except ssl.SSLError as exc:
            labels.dial_errors.labels(spec.endpoint_id, "tls").inc()
            _log.warn_throttled(
                "TLS to the service failed", endpoint_id=spec.endpoint_id, error=str(exc)
            )
            stream.reset(ResetReason.UNREACHABLE)
        except OSError as unreachable:
            labels.dial_errors.labels(spec.endpoint_id, "unreachable").inc()
            self._dial_failed("unreachable", unreachable)
            stream.reset(ResetReason.UNREACHABLE)

    def _dial_failed(self, reason: str, error: object) -> None:
        """Say which listener could not reach its service and why (a missing or mistyped Unix
        socket path, a service that is down): its clients only see 502 or 504. Once a minute
        per reason for each endpoint, the rest counted as `suppressed`."""
        self._dial_warnings.warn(
            reason,
            "cannot connect to the service",
            endpoint_id=self.spec.endpoint_id,
            service=self.dialer.service,
            reason=reason,
            error=str(error) or type(error).__name__,
        )

    async def stop(self, grace: float) -> None:
        """GoAway, let open streams finish within `grace`, close."""
        self.stopping = True
        tunnels = [t for t in (self.tunnel, *self._draining) if t is not None]
        await asyncio.gather(*(t.drain_and_close(grace) for t in tunnels))
        await asyncio.gather(*self._runners, return_exceptions=True)
        for task in list(self._dials):
            task.cancel()


class Agent:
    """`pico agent`: registers every configured endpoint.

    `endpoints` replaces the configured ones: (spec, dialer) pairs (the SDK's in-process
    services).
    """

    def __init__(
        self, config: AgentConfig, endpoints: Sequence[tuple[EndpointSpec, Dialer]] | None = None
    ) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.auth_headers: dict[str, str] = (
            {"Authorization": f"Bearer {config.auth.api_key}"} if config.auth.api_key else {}
        )
        tls = config.server.tls
        # wss: the tunnel is encrypted, copied rather than spliced (see pico.mux.tunnel).
        self.tls = (
            client_context(
                tls.root_ca, tls.cert, tls.key, insecure_skip_verify=tls.insecure_skip_verify
            )
            if config.server.url.startswith("https")
            else None
        )
        service = config.tls
        # The services of https listeners are verified against tls.root_ca.
        self.service_tls = client_context(
            service.root_ca,
            service.cert,
            service.key,
            insecure_skip_verify=service.insecure_skip_verify,
        )
        if endpoints is None:
            endpoints = [
                (spec, dialer_for(spec, self.service_tls)) for spec in config.listener_specs()
            ]
        self.links = [EndpointLink(self, spec, dialer) for spec, dialer in endpoints]
        self._admin: web.AppRunner | None = None
        # What open streams get to finish once run() is told to stop.
        self.grace = _GRACE_PERIOD

    async def start_admin(self) -> tuple[str, int]:
        """Serve /health and /metrics on `admin.bind_addr`."""
        app = web.Application()

        async def health(_: web.Request) -> web.StreamResponse:
            return web.Response(status=200)

        async def metrics(_: web.Request) -> web.StreamResponse:
            return web.Response(
                body=generate_latest(self.metrics.registry),
                headers={"Content-Type": CONTENT_TYPE_LATEST},
            )

        app.router.add_get("/health", health)
        app.router.add_get("/metrics", metrics)
        runner, addr = await serve_app(app, self.config.admin.bind_addr, "admin.bind_addr")
        self._admin = runner
        return addr

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set (then drain: open streams get `grace` seconds) or a link
        is rejected (AgentRejected)."""
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(link.run()) for link in self.links]
        stopped = loop.create_task(stop.wait())
        try:
            pending: set[asyncio.Future[Any]] = {*tasks, stopped}
            while stopped in pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not stopped and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
        finally:
            await asyncio.gather(*(link.stop(self.grace) for link in self.links))
            for task in [*tasks, stopped]:
                task.cancel()
            await asyncio.gather(*tasks, stopped, return_exceptions=True)
            if self._admin is not None:
                await self._admin.cleanup()
