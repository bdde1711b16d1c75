"""Keeps gossip and the routing state in step, both ways.

Out: this node's `tls` (its ports that speak TLS), `proxy_addr`, `admin_addr` and
`endpoint:<id>` = local upstream count are published as gossip keys (a count of 0 deletes the
key). `tls` goes first: entries arrive in version order, so a node is never routed to before
its peers know how to connect to it. In: gossip events about other nodes
update `ClusterState`; a node is routed to only once both of its addresses are known. A node
that restarted under the same id (a new gossip incarnation) is dropped with all its endpoints
and starts again as pending: its new addresses and endpoints follow.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pico import log
from pico.config.values import is_member_addr
from pico.gossip import (
    Gossiper,
    GossipEvent,
    NodeExpired,
    NodeJoined,
    NodeKeyDeleted,
    NodeLeft,
    NodeReachable,
    NodeRestarted,
    NodeUnreachable,
    NodeUpdated,
)
from pico.server.cluster import ClusterState, NodeInfo, NodeStatus

_log = log.get_logger("cluster")

ENDPOINT_PREFIX = "endpoint:"
TLS_KEY = "tls"
_TLS_PORTS = frozenset({"proxy", "admin"})
# A node with more endpoints than peers accept would warn on every new one: once a minute.
_UNPUBLISHED_WARN_EVERY = 60.0


class _Pending:
    __slots__ = ("admin_addr", "endpoints", "proxy_addr", "status", "tls")

    def __init__(self) -> None:
        self.proxy_addr = ""
        self.admin_addr = ""
        self.tls: frozenset[str] = frozenset()
        self.status: NodeStatus = "active"
        self.endpoints: dict[str, int] = {}


class ClusterSyncer:
    """Maps gossip events onto `ClusterState` and local endpoint counts onto gossip keys."""

    def __init__(
        self,
        cluster: ClusterState,
        gossiper: Gossiper,
        on_node_gone: Callable[[str], None] | None = None,
        on_endpoint: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.cluster = cluster
        self.gossiper = gossiper
        self.on_node_gone = on_node_gone
        # Told (endpoint id, True) when a remote node starts serving an endpoint and
        # (endpoint id, False) when one stops (key deleted, node unreachable or left).
        self.on_endpoint = on_endpoint
        self._pending: dict[str, _Pending] = {}
        self._unpublished_warned_at = float("-inf")

    def publish_local(self) -> None:
        """Publish this node's addresses and endpoint counts."""
        local = self.cluster.local
        if local.tls:
            self.gossiper.upsert(TLS_KEY, ",".join(sorted(local.tls)))
        self.gossiper.upsert("proxy_addr", local.proxy_addr)
        self.gossiper.upsert("admin_addr", local.admin_addr)
        for endpoint_id, count in local.endpoints.items():
            self._publish_endpoint(endpoint_id, count)

    def local_endpoint_changed(self, endpoint_id: str, count: int) -> None:
        """Registry listener: gossip the new local upstream count."""
        if count > 0:
            self._publish_endpoint(endpoint_id, count)
        else:
            self.gossiper.delete(ENDPOINT_PREFIX + endpoint_id)

    def _publish_endpoint(self, endpoint_id: str, count: int) -> None:
        try:
            self.gossiper.upsert(ENDPOINT_PREFIX + endpoint_id, str(count))
        except ValueError as exc:
            # Over what peers accept (gossip.max_entries_per_node): served here, not elsewhere.
            now = time.monotonic()
            if now - self._unpublished_warned_at >= _UNPUBLISHED_WARN_EVERY:
                self._unpublished_warned_at = now
                _log.warn("endpoint not gossiped", endpoint_id=endpoint_id, error=str(exc))

    def apply(self, events: list[GossipEvent]) -> None:
        """Apply a batch of gossip events to the cluster state."""
        for event in events:
            if event.id == self.cluster.local.id:
                continue
            match event:
                case NodeJoined():
                    if event.id not in self.cluster.remotes:
                        self._pending.setdefault(event.id, _Pending())
                case NodeUpdated():
                    self._updated(event.id, event.key, event.value)
                case NodeKeyDeleted():
                    self._deleted(event.id, event.key)
                case NodeUnreachable():
                    self._set_status(event.id, "unreachable")
                case NodeReachable():
                    self._set_status(event.id, "active")
                case NodeLeft():
                    self._set_status(event.id, "left")
                case NodeRestarted():
                    self._restarted(event.id)
                case NodeExpired():
                    self._pending.pop(event.id, None)
                    if self.cluster.remotes.pop(event.id, None) is not None:
                        _log.info("node expired", node_id=event.id)
                    if self.on_node_gone is not None:
                        self.on_node_gone(event.id)

    def _restarted(self, node_id: str) -> None:
        """Forget a node's last life: its endpoints are gone; its new addresses follow."""
        node = self.cluster.remotes.pop(node_id, None)
        self._pending[node_id] = _Pending()
        if node is not None:
            _log.info("node restarted", node_id=node_id)
            if node.status == "active":
                for endpoint_id in node.endpoints:
                    self._notify(endpoint_id, False)
        if self.on_node_gone is not None:
            self.on_node_gone(node_id)

    def _updated(self, node_id: str, key: str, value: str) -> None:
        node = self.cluster.remotes.get(node_id)
        pending = self._pending.get(node_id)
        if node is None and pending is None:
            pending = self._pending[node_id] = _Pending()
        if key.startswith(ENDPOINT_PREFIX):
            try:
                count = int(value)
            except ValueError:
                _log.warn("bad endpoint count in gossip", node_id=node_id, key=key, value=value)
                return
            endpoints = node.endpoints if node is not None else pending.endpoints  # type: ignore[union-attr]
            endpoint_id = key[len(ENDPOINT_PREFIX) :]
            if count > 0:
                endpoints[endpoint_id] = count
            else:
                endpoints.pop(endpoint_id, None)
            if node is not None and node.status == "active":
                self._notify(endpoint_id, count > 0)
            return
        if key not in ("proxy_addr", "admin_addr", TLS_KEY):
            _log.debug("ignoring unknown gossip key", node_id=node_id, key=key)
            return
        if node is not None:
            # Addresses are fixed for a node's life; a re-versioned copy (compaction) is ignored.
            return
        assert pending is not None
        if key == TLS_KEY:
            pending.tls = frozenset(value.split(",")) & _TLS_PORTS
            return
        if not is_member_addr(value):
            # It would go into URLs (`?forward=`, forwarding): a path, userinfo or another
            # port's syntax must never get there. The node stays unknown until it sends a valid one.
            _log.debug("ignoring invalid address in gossip", node_id=node_id, key=key)
            return
        setattr(pending, key, value)
        if pending.proxy_addr and pending.admin_addr:
            del self._pending[node_id]
            self.cluster.remotes[node_id] = NodeInfo(
                id=node_id,
                proxy_addr=pending.proxy_addr,
                admin_addr=pending.admin_addr,
                status=pending.status,
                endpoints=pending.endpoints,
                tls=pending.tls,
            )
            _log.info("node joined", node_id=node_id, proxy_addr=pending.proxy_addr)
            if pending.status == "active":
                for endpoint_id in pending.endpoints:
                    self._notify(endpoint_id, True)

    def _deleted(self, node_id: str, key: str) -> None:
        if not key.startswith(ENDPOINT_PREFIX):
            return
        node = self.cluster.remotes.get(node_id)
        pending = self._pending.get(node_id)
        endpoints = node.endpoints if node is not None else pending.endpoints if pending else None
        if endpoints is not None:
            endpoint_id = key[len(ENDPOINT_PREFIX) :]
            if endpoints.pop(endpoint_id, None) is not None and node is not None:
                self._notify(endpoint_id, False)

    def _set_status(self, node_id: str, status: NodeStatus) -> None:
        node = self.cluster.remotes.get(node_id)
        if node is not None:
            if node.status != status:
                _log.info("node status changed", node_id=node_id, status=status)
                for endpoint_id in node.endpoints:
                    self._notify(endpoint_id, status == "active")
            node.status = status
        elif node_id in self._pending:
            self._pending[node_id].status = status
        if status == "left" and self.on_node_gone is not None:
            self.on_node_gone(node_id)

    def _notify(self, endpoint_id: str, available: bool) -> None:
        if self.on_endpoint is not None:
            self.on_endpoint(endpoint_id, available)
