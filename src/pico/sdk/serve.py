"""`Served`: one endpoint served from this process, by the agent's own code.

An `Agent` with one link whose dialer is an `InProcessDialer`: reconnecting with backoff,
following a node's GoAway, refusing streams while stopping, limits and metrics are the
agent's. `Served` adds the order around it: the service starts (an ASGI app's lifespan) before
the endpoint registers, and after `close()` has drained the tunnel the service finishes (the
lifespan shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Literal, Protocol

from pico.agent.agent import Agent, AgentMetrics, AgentRejected
from pico.agent.inprocess import InProcessDialer
from pico.config import (
    AgentConfig,
    ConfigError,
    EndpointSpec,
    check_endpoint_id,
    load_config_dict,
)
from pico.sdk.errors import EndpointRejected, PicoError

# What close() gives in-flight requests by default (the agent's own drain period).
DEFAULT_GRACE = 30.0


class InProcessService(Protocol):
    """What `Served` runs: a protocol per stream, and a start and an end around them."""

    def protocol_factory(self) -> asyncio.BaseProtocol:
        """The protocol of a new stream (raises ConnectionRefusedError to refuse it)."""

    def report_limits(self, on_limit: Callable[[str], None]) -> None:
        """Call `on_limit(name)` for each request or connection refused for the limit `name`
        (the agent counts it in pico_agent_limit_rejections_total)."""

    async def startup(self) -> None:
        """Before the endpoint registers (raises to abort)."""

    def shutdown_connections(self) -> None:
        """Right after GoAway: idle connections may close, busy ones finish."""

    async def finish(self) -> None:
        """After the drain: stop what is left."""


def agent_config(endpoint: str, protocol: str, url: str, api_key: str, root_ca: str) -> AgentConfig:
    """The agent configuration of an SDK endpoint. Raises ValueError naming the bad value."""
    tls = {"root_ca": root_ca} if root_ca else {}
    # The listener's address is never dialed (the dialer is in-process); it is there because
    # an agent config names at least one endpoint.
    listener = {"endpoint_id": endpoint, "addr": "1", "protocol": protocol}
    try:
        return load_config_dict(
            AgentConfig,
            {
                "listeners": [listener],
                "server": {"url": url, "tls": tls},
                "auth": {"api_key": api_key},
            },
        )
    except ConfigError as exc:
        raise ValueError(f"invalid argument: {exc}") from None


class Served:
    """An endpoint served from this process. Use it as an async context manager.

    `async with` runs the service's startup, registers the endpoint and returns once the
    node has accepted it (retrying with backoff while no node answers: cancel to give up);
    leaving the block calls `close()`. Raises EndpointRejected when the node refuses the
    endpoint for a reason retrying will not fix (token, permissions), ValueError for bad
    arguments.
    """

    def __init__(
        self,
        service: InProcessService,
        endpoint: str,
        *,
        url: str,
        api_key: str = "",
        root_ca: str = "",
        protocol: Literal["http", "tcp"] = "http",
        grace: float = DEFAULT_GRACE,
    ) -> None:
        try:
            check_endpoint_id(endpoint)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        if grace < 0:
            raise ValueError(f"grace={grace!r}: must be >= 0 seconds")
        self.endpoint = endpoint
        self.grace = grace
        self._service = service
        config = agent_config(endpoint, protocol, url, api_key, root_ca)
        dialer = InProcessDialer(service.protocol_factory, name=f"in-process:{endpoint}")
        self._agent = Agent(config, [(EndpointSpec(endpoint, "", 0, protocol), dialer)])
        service.report_limits(self._agent.links[0].limit_hit)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._used = False  # entered (or started): see __del__
        self._closing: asyncio.Task[None] | None = None
        self._finished: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        """True while the endpoint's tunnel is up."""
        return self._agent.links[0].connected.is_set()

    @property
    def metrics(self) -> AgentMetrics:
        """The agent's Prometheus metrics of this endpoint."""
        return self._agent.metrics

    async def __aenter__(self) -> Served:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __del__(self) -> None:
        # `pico.sdk.serve_wsgi(app, ...)` on its own line builds this and serves nothing: say
        # so, as Python does for a coroutine that was never awaited.
        if not getattr(self, "_used", True):
            warnings.warn(
                f"pico.sdk: endpoint {self.endpoint!r} was never served: use `async with "
                "pico.sdk.serve_asgi(...)` (or serve_wsgi, listen), or pico.sdk.run(...) "
                "to block",
                RuntimeWarning,
                stacklevel=2,
            )

    async def start(self) -> None:
        """Start the service, then register the endpoint (see the class docstring)."""
        self._used = True
        if self._task is not None:
            raise RuntimeError("already started")
        await self._service.startup()
        agent = self._agent
        self._task = asyncio.get_running_loop().create_task(agent.run(self._stop))
        connected = asyncio.ensure_future(agent.links[0].connected.wait())
        try:
            await asyncio.wait({self._task, connected}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await self.close(0)
            raise
        finally:
            connected.cancel()
        if self._task.done():
            await self._finish()
            self._raise_rejection()

    async def wait_closed(self) -> None:
        """Wait until the endpoint is closed: by `close()`, or a rejection by the node
        (raises EndpointRejected). Safe to cancel: the endpoint stays up."""
        if self._task is None:
            raise RuntimeError("not started: use `async with`")
        await asyncio.shield(self._task)
        if self._closing is not None:
            await asyncio.shield(self._closing)
        self._raise_rejection()

    async def close(self, grace: float | None = None) -> None:
        """GoAway to the node, let in-flight requests finish within `grace` seconds (the
        constructor's by default), close the tunnel, then the service. Idempotent; safe to
        cancel (the closing goes on and completes)."""
        if grace is not None:
            self.grace = grace
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._agent.grace = self.grace  # read when the drain starts
        self._stop.set()
        if self._task is not None:
            self._service.shutdown_connections()
            with contextlib.suppress(Exception):
                await self._task  # a rejection is wait_closed()'s to report
        await self._finish()

    async def _finish(self) -> None:
        """The service's end, once (after a rejection, and again on close())."""
        if self._finished is None:
            self._finished = asyncio.get_running_loop().create_task(self._service.finish())
        await asyncio.shield(self._finished)

    def _raise_rejection(self) -> None:
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, AgentRejected):
            raise EndpointRejected(str(exc)) from None
        if exc is not None:
            raise PicoError(f"serving {self.endpoint!r} failed: {exc}") from exc
