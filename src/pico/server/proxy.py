"""Routing for the proxy port: local tunnels first, else another node that has the endpoint."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pico.http.channel import Upstream
from pico.server.cluster import ClusterState
from pico.server.upstream import EndpointRegistry


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
