"""The agent: one tunnel per endpoint, each stream spliced to a new TCP connection to the service.

The agent never parses HTTP: bytes pass through unchanged, so WebSocket, SSE and anything else
work. It reconnects forever with full-jitter exponential backoff on network errors and 5xx,
and stops with a clear message when the server rejects it (400, 401, 403).
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any, cast

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from pico import log
from pico.config import AgentConfig, EndpointSpec
from pico.mux import splice
from pico.mux.frame import ResetReason
from pico.mux.handshake import HandshakeError, open_websocket
from pico.mux.session import MAX_SIZED_PAYLOAD
from pico.mux.stream import MuxStream
from pico.mux.tunnel import Tunnel
from pico.webapp import serve_app

_log = log.get_logger("agent")

# Reconnect backoff: full jitter over an exponential ceiling (0.5 s doubling to 30 s), so a
# fleet of agents that lost the same node does not reconnect in lockstep.
_BACKOFF_MIN = 0.5
_BACKOFF_MAX = 30.0
# Open streams get this long to finish after SIGTERM before the tunnel is closed.
_GRACE_PERIOD = 30.0
_FATAL_STATUSES = (400, 401, 403, 404)
# Bounds connecting plus the WebSocket handshake to a node.
_CONNECT_TIMEOUT = 10.0


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
        self.dial_errors = Counter(
            "pico_agent_dial_errors_total",
            "Failed connections to the local service, by reason.",
            ["endpoint", "reason"],
            registry=r,
        )


class _ServiceSide(asyncio.Protocol):
    """The TCP connection to the local service, spliced to one stream."""

    def __init__(self, stream: MuxStream, on_done: Any) -> None:
        self.stream = stream
        self.on_done = on_done
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.stream.set_receiver(_StreamSide(self))

    def data_received(self, data: bytes) -> None:
        self.stream.write(data)

    def eof_received(self) -> bool:
        self.stream.write_eof()
        return True  # the request may still be arriving

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.stream.closed:
            if exc is None:
                self.stream.write_eof()
            else:
                # Not a dial-failure reason: the service may have acted on the request, so
                # the node must not replay it on another upstream.
                self.stream.reset(ResetReason.CANCELLED)
        self.on_done()

    def pause_writing(self) -> None:
        self.stream.pause_reading()

    def resume_writing(self) -> None:
        self.stream.resume_reading()

    def pause_source(self) -> None:
        """The stream cannot take more (window or tunnel full): stop reading the service."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_source(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()


class _SplicedServiceSide(_ServiceSide):
    """A service connection whose bytes reach the tunnel by splice(2), never read into Python.

    The loop's transport still writes the request to the service; reading goes through a
    duplicate descriptor: socket -> pipe -> tunnel socket (see pico.mux.splice).
    """

    def __init__(self, stream: MuxStream, on_done: Any) -> None:
        super().__init__(stream, on_done)
        self._loop = asyncio.get_running_loop()
        self._fd = -1
        self._in_flight: splice.Pipe | None = None  # the pipe of the chunk on its way
        self._paused = False
        self._reading = False
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Splice reads, the loop must not. uvloop starts reading right after this method
        # returns, whatever it was told here: pause again before its first poll.
        reader = cast(asyncio.Transport, transport)
        reader.pause_reading()
        self._loop.call_soon(reader.pause_reading)
        sock = transport.get_extra_info("socket")
        self._fd = os.dup(sock.fileno())
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        # The loop read before its pause took effect: these bytes go first, as bytes (the
        # stream then pauses the splice until they are framed).
        if self.transport is not None:
            self.transport.pause_reading()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._unwatch()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().connection_lost(exc)

    def pause_source(self) -> None:
        self._paused = True
        self._unwatch()

    def resume_source(self) -> None:
        self._paused = False
        self._watch()

    def _watch(self) -> None:
        if self._reading or self._fd < 0 or self._eof or self._paused or self._in_flight:
            return
        self._loop.add_reader(self._fd, self._readable)
        self._reading = True

    def _unwatch(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _chunk_sent(self) -> None:
        self._in_flight = None
        self._watch()

    def _readable(self) -> None:
        stream = self.stream
        pipes = stream.tunnel.pipes
        if stream.closed or pipes is None:
            self._unwatch()
            return
        if self._in_flight is not None or stream.get_write_buffer_size():
            self._unwatch()  # watched again once the chunk is out, or the stream resumes
            return
        window = stream.send_window()
        if window <= 0 or stream.tunnel.write_blocked:
            self._unwatch()
            stream.pause_if_blocked()  # resume_source() follows
            return
        pipe = pipes.take()
        try:
            n = pipe.fill(self._fd, min(window, splice.PIPE_SIZE, MAX_SIZED_PAYLOAD))
        except BlockingIOError:
            pipes.give(pipe)
            return
        except OSError:
            # The service broke the connection mid-response: never replayed elsewhere.
            pipes.give(pipe)  # nothing moved into it
            self._unwatch()
            stream.reset(ResetReason.CANCELLED)
            if self.transport is not None:
                self.transport.abort()
            return
        if n == 0:
            pipes.give(pipe)
            self._eof = True
            self._unwatch()
            stream.write_eof()
            return
        self._in_flight = pipe
        pipe.on_drained = self._chunk_sent
        stream.write_chunk(splice.PipeChunk(pipe, n))


class _StreamSide:
    """Receiver of the stream: writes into the service connection."""

    __slots__ = ("service",)

    def __init__(self, service: _ServiceSide) -> None:
        self.service = service

    def data_received(self, data: bytes | memoryview) -> None:
        transport = self.service.transport
        if transport is not None:
            if type(data) is memoryview and transport.get_write_buffer_size():
                data = bytes(data)  # kept until the service reads: do not pin a read buffer
            transport.write(data)

    def eof_received(self) -> None:
        t = self.service.transport
        if t is not None and t.can_write_eof():
            t.write_eof()

    def connection_lost(self, reason: ResetReason | None) -> None:
        t = self.service.transport
        if t is not None:
            if reason is None or reason == ResetReason.NORMAL:
                t.close()  # the node is done with the connection: let queued bytes out
            else:
                t.abort()

    def pause_writing(self) -> None:
        self.service.pause_source()

    def resume_writing(self) -> None:
        self.service.resume_source()


class EndpointLink:
    """Keeps one endpoint's tunnel up: connect, serve, reconnect."""

    def __init__(
        self,
        agent: Agent,
        spec: EndpointSpec,
    ) -> None:
        self.agent = agent
        self.spec = spec
        self.tunnel: Tunnel | None = None
        self.stopping = False
        self._dials: set[asyncio.Task[None]] = set()
        # Tunnels of a node that sent GoAway, finishing their streams, and their run() tasks.
        self._draining: set[Tunnel] = set()
        self._runners: set[asyncio.Task[None]] = set()
        base = agent.config.server.url.rstrip("/")
        # The endpoint path is appended to any path prefix of server.url (a reverse proxy
        # in front of the cluster may serve it under a prefix).
        ws_base = "ws" + base[4:] if base.startswith("http") else base
        self.url = f"{ws_base}/pico/v1/upstream/{spec.endpoint_id}"

    async def run(self) -> None:
        """Connect and serve until stopped. Raises AgentRejected on a fatal refusal."""
        attempt = 0
        endpoint_id = self.spec.endpoint_id
        while not self.stopping:
            try:
                transport, rest = await open_websocket(
                    self.url, self.agent.auth_headers, timeout=_CONNECT_TIMEOUT
                )
            except HandshakeError as exc:
                if exc.status in _FATAL_STATUSES:
                    raise AgentRejected(
                        f"server rejected endpoint {endpoint_id!r}: {exc.status} {exc.message}"
                    ) from exc
                _log.warn(
                    "connect failed", endpoint_id=endpoint_id, status=exc.status, error=exc.message
                )
            except (OSError, TimeoutError) as exc:
                _log.warn(
                    "connect failed", endpoint_id=endpoint_id, error=str(exc) or type(exc).__name__
                )
            else:
                attempt = 0
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
        )
        moved = asyncio.Event()
        tunnel.on_goaway = moved.set
        tunnel.attach(transport, rest, resume=True, direct=True)
        self.tunnel = tunnel
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
            m.connected.labels(endpoint_id).set(0)
        if moved.is_set() and not runner.done() and not self.stopping:
            # Open streams finish on the old tunnel while a new one is opened (through the
            # load balancer, to another node): a node restart loses no requests.
            _log.info("server going away; reconnecting", endpoint_id=endpoint_id)
            self._draining.add(tunnel)
            runner.add_done_callback(lambda _: self._draining.discard(tunnel))
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
            return True
        await runner
        if not self.stopping:
            _log.warn(
                "disconnected; reconnecting", endpoint_id=endpoint_id, reason=tunnel.close_reason
            )
        return False

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
        side = _SplicedServiceSide if stream.tunnel.splicing else _ServiceSide
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: side(stream, active.dec), spec.host, spec.port),
                self.agent.config.forwarder.timeout,
            )
            active.inc()
        except TimeoutError:
            labels.dial_errors.labels(spec.endpoint_id, "timeout").inc()
            stream.reset(ResetReason.TIMEOUT)
        except ConnectionRefusedError:
            labels.dial_errors.labels(spec.endpoint_id, "refused").inc()
            stream.reset(ResetReason.REFUSED)
        except OSError:
            labels.dial_errors.labels(spec.endpoint_id, "unreachable").inc()
            stream.reset(ResetReason.UNREACHABLE)

    async def stop(self, grace: float) -> None:
        """GoAway, let open streams finish within `grace`, close."""
        self.stopping = True
        tunnels = [t for t in (self.tunnel, *self._draining) if t is not None]
        await asyncio.gather(*(t.drain_and_close(grace) for t in tunnels))
        await asyncio.gather(*self._runners, return_exceptions=True)
        for task in list(self._dials):
            task.cancel()


class Agent:
    """`pico agent`: registers every configured endpoint."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.auth_headers: dict[str, str] = (
            {"Authorization": f"Bearer {config.auth.api_key}"} if config.auth.api_key else {}
        )
        self.links = [EndpointLink(self, spec) for spec in config.parsed_endpoints()]
        self._admin: web.AppRunner | None = None

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
        """Run until `stop` is set (then drain) or a link is rejected (AgentRejected)."""
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
            await asyncio.gather(*(link.stop(_GRACE_PERIOD) for link in self.links))
            for task in [*tasks, stopped]:
                task.cancel()
            await asyncio.gather(*tasks, stopped, return_exceptions=True)
            if self._admin is not None:
                await self._admin.cleanup()
