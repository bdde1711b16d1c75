"""Events a :class:`~pico.gossip.protocol.Gossiper` reports about the cluster.

Each event is a frozen value. The cluster syncer drains them with ``Gossiper.events()`` and maps
them onto routing state: join → pending node, updates fill it in, unreachable/reachable/left set its
status, expired removes it, restarted replaces everything known about it with what follows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class NodeJoined:
    """A node we did not know about was discovered."""

    id: str
    addr: str


@dataclass(frozen=True, slots=True)
class NodeUpdated:
    """A node's key was created or its value changed."""

    id: str
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class NodeKeyDeleted:
    """A node's key was deleted (a tombstone arrived, or compaction dropped it)."""

    id: str
    key: str


@dataclass(frozen=True, slots=True)
class NodeUnreachable:
    """The failure detector suspects the node (phi above the threshold)."""

    id: str


@dataclass(frozen=True, slots=True)
class NodeReachable:
    """A node that was unreachable was heard from again."""

    id: str


@dataclass(frozen=True, slots=True)
class NodeLeft:
    """The node announced that it left the cluster."""

    id: str


@dataclass(frozen=True, slots=True)
class NodeExpired:
    """A node was removed: it left or was unreachable for the expiry period (that life of it
    never comes back), or it was only ever named in digests and no state came for it."""

    id: str


@dataclass(frozen=True, slots=True)
class NodeRestarted:
    """A new life (incarnation) of a known node id: forget its old keys; ``NodeUpdated`` events
    with its new ones follow. ``addr`` is its gossip address in this life."""

    id: str
    addr: str


GossipEvent = (
    NodeJoined
    | NodeUpdated
    | NodeKeyDeleted
    | NodeUnreachable
    | NodeReachable
    | NodeLeft
    | NodeExpired
    | NodeRestarted
)
