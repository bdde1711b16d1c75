"""What this node knows about the cluster: itself plus the nodes gossip told it about.

The local node's endpoints come from the `EndpointRegistry`; remote nodes are filled in by the
gossip syncer. Routing asks `remote_candidates()` for the nodes able to serve an endpoint.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

NodeStatus = Literal["active", "unreachable", "left"]


@dataclass(slots=True)
class NodeInfo:
    """One node as the cluster API shows it."""

    id: str
    proxy_addr: str
    admin_addr: str
    status: NodeStatus = "active"
    endpoints: dict[str, int] = field(default_factory=dict)
    # Which of its ports ("proxy", "admin") speak TLS: other nodes connect to them over TLS.
    tls: frozenset[str] = frozenset()

    def metadata(self) -> dict[str, object]:
        """The `/status/cluster/nodes` shape."""
        return {
            "id": self.id,
            "status": self.status,
            "proxy_addr": self.proxy_addr,
            "admin_addr": self.admin_addr,
            "endpoints": len(self.endpoints),
            "upstreams": sum(self.endpoints.values()),
        }

    def detail(self) -> dict[str, object]:
        """The `/status/cluster/nodes/{id}` shape (`endpoints` is null when empty)."""
        return {
            "id": self.id,
            "status": self.status,
            "proxy_addr": self.proxy_addr,
            "admin_addr": self.admin_addr,
            "endpoints": dict(self.endpoints) or None,
        }


class ClusterState:
    """The local node and every known remote node."""

    def __init__(self, local: NodeInfo, rng: random.Random | None = None) -> None:
        self.local = local
        self.remotes: dict[str, NodeInfo] = {}
        self._rng = rng or random.Random()

    def set_local_endpoint(self, endpoint_id: str, count: int) -> None:
        """Record the local upstream count of an endpoint (0 removes it)."""
        if count > 0:
            self.local.endpoints[endpoint_id] = count
        else:
            self.local.endpoints.pop(endpoint_id, None)

    def node(self, node_id: str) -> NodeInfo | None:
        """A node by id; `local` names this node."""
        if node_id in ("local", self.local.id):
            return self.local
        return self.remotes.get(node_id)

    def nodes(self) -> list[NodeInfo]:
        """Every known node, sorted by id."""
        return sorted([self.local, *self.remotes.values()], key=lambda n: n.id)

    def remote_candidates(self, endpoint_id: str) -> list[NodeInfo]:
        """Active remote nodes with the endpoint, in a random order weighted by upstream count.

        Each position is drawn in proportion to the remaining nodes' counts, so load spreads
        over all nodes that have the endpoint and a retry goes to a different node.
        """
        pool = [
            (n, n.endpoints.get(endpoint_id, 0))
            for n in self.remotes.values()
            if n.status == "active" and n.endpoints.get(endpoint_id, 0) > 0
        ]
        order: list[NodeInfo] = []
        while pool:
            total = sum(w for _, w in pool)
            pick = self._rng.uniform(0, total)
            for i, (node, weight) in enumerate(pool):
                pick -= weight
                if pick <= 0 or i == len(pool) - 1:
                    order.append(node)
                    pool.pop(i)
                    break
        return order
