"""Routing for the proxy port: local tunnels first, else another node that has the endpoint.

Also where a request waits, briefly, for an endpoint that has just lost all of its upstreams
(its node restarting or dying while the agents reconnect elsewhere): instead of failing during
those few hundred milliseconds, the request goes out as soon as gossip or a local tunnel says
the endpoint is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from pico.http.channel import Cancellable, Upstream
from pico.server.cluster import ClusterState
from pico.server.upstream import EndpointRegistry

# An endpoint that had upstreams this recently may be waited for; older ones are unknown.
_RECENT = 30.0
# Bounds the memory held by waiting requests on one node.
_MAX_WAITERS = 10_000


class _Waiter:
    __slots__ = ("callback", "endpoint_id", "router")

    def __init__(self, router: NodeRouter, endpoint_id: str, callback: Callable[[], None]) -> None:
        self.router = router
        self.endpoint_id = endpoint_id
        self.callback = callback

    def cancel(self) -> None:
        self.router._remove(self)


class NodeRouter:
    """Chooses upstreams for a request on this node.

    A request for an endpoint with a local tunnel goes through it (round-robin). Otherwise,
    unless another node already forwarded it (one hop at most), it goes to a node that has one.
    """

    def __init__(
        self,
        registry: EndpointRegistry,
        cluster: ClusterState,
        remote_upstream: Callable[[str], Upstream | None] | None = None,
    ) -> None:
        self.registry = registry
        self.cluster = cluster
        self.remote_upstream = remote_upstream
        self._lost: dict[str, float] = {}
        self._waiters: dict[str, list[_Waiter]] = {}
        self._waiting = 0

    def candidates(self, endpoint_id: str, forwarded: bool) -> Sequence[Upstream]:
        local = self.registry.candidates(endpoint_id)
        if local or forwarded or self.remote_upstream is None:
            return local
        out: list[Upstream] = []
        for node in self.cluster.remote_candidates(endpoint_id):
            upstream = self.remote_upstream(node.id)
            if upstream is not None:
                out.append(upstream)
        return out

    # -- waiting for an upstream -------------------------------------------------------------

    def wait_for_upstream(
        self, endpoint_id: str, callback: Callable[[], None], *, known: bool = False
    ) -> Cancellable | None:
        if self._waiting >= _MAX_WAITERS:
            return None
        if not known and not self._recently_served(endpoint_id):
            return None
        waiter = _Waiter(self, endpoint_id, callback)
        self._waiters.setdefault(endpoint_id, []).append(waiter)
        self._waiting += 1
        return waiter

    def _recently_served(self, endpoint_id: str) -> bool:
        if self.registry.counts().get(endpoint_id) or any(
            endpoint_id in node.endpoints for node in self.cluster.remotes.values()
        ):
            return True  # known, but every attempt failed (e.g. a node that just died)
        lost = self._lost.get(endpoint_id)
        return lost is not None and time.monotonic() - lost < _RECENT

    def _remove(self, waiter: _Waiter) -> None:
        waiters = self._waiters.get(waiter.endpoint_id)
        if waiters and waiter in waiters:
            waiters.remove(waiter)
            self._waiting -= 1
            if not waiters:
                del self._waiters[waiter.endpoint_id]

    def endpoint_lost(self, endpoint_id: str) -> None:
        """An upstream of the endpoint went away (locally, or a node left or failed)."""
        now = time.monotonic()
        self._lost[endpoint_id] = now
        if len(self._lost) > _MAX_WAITERS:
            self._lost = {k: t for k, t in self._lost.items() if now - t < _RECENT}

    def endpoint_available(self, endpoint_id: str) -> None:
        """An upstream of the endpoint appeared: release the requests waiting for it."""
        waiters = self._waiters.pop(endpoint_id, None)
        if not waiters:
            return
        self._waiting -= len(waiters)
        # Called from inside registry and gossip updates: resume the requests afterwards.
        loop = asyncio.get_running_loop()
        for waiter in waiters:
            loop.call_soon(waiter.callback)
