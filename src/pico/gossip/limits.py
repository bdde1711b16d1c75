"""What peers can make a node hold: the bounds on gossip state, and the checks against them.

Gossip without keys is unauthenticated UDP: anyone who can reach the port can name nodes,
send entries and claim versions. Each bound below caps what that costs (memory, CPU, and the
versions a forged delta can claim); what goes over is refused and counted by reason (see
:mod:`pico.gossip.rejections`). Every node should run with the same values: a node refuses
what a peer with larger limits publishes.
"""

from __future__ import annotations

from dataclasses import dataclass

from pico.gossip.records import COMPACT_KEY, Entry, NodeDelta
from pico.gossip.rejections import Rejections


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on gossip state; sizes are UTF-8 bytes.

    * ``max_nodes``: nodes known at once, this one included (memory: their entries; CPU: each
      round's digest and failure detection).
    * ``max_entries_per_node``: entries held for one node, tombstones and internal keys
      included. A node publishes at most this many less two.
    * ``max_key_size``: an entry key or a node id.
    * ``max_value_size``: an entry value or a gossip address.
    * ``max_version_step``: how far one delta may move a node's version past what we hold. A
      node's own versions stay below it (it starts a new incarnation first).
    """

    max_nodes: int = 1024
    max_entries_per_node: int = 16384
    max_key_size: int = 256
    max_value_size: int = 1024
    max_version_step: int = 1 << 32

    def __post_init__(self) -> None:
        if self.max_nodes < 2:
            raise ValueError("max_nodes must be at least 2")
        if self.max_entries_per_node < 8:
            raise ValueError("max_entries_per_node must be at least 8")
        if self.max_key_size < 32 or self.max_value_size < 32:
            raise ValueError("max_key_size and max_value_size must be at least 32")
        if self.max_version_step < 2 * self.max_entries_per_node:
            # A new incarnation re-versions the surviving entries from 1: they must fit.
            raise ValueError("max_version_step must be at least 2 * max_entries_per_node")


def text_size(text: str) -> int:
    """UTF-8 size of ``text``, without encoding it when it is ASCII (the usual case)."""
    return len(text) if text.isascii() else len(text.encode())


class Admission:
    """Checks what peers send against ``limits``; what it refuses is counted in ``rejections``.

    Each check returns whether the input fits. A chunk of a node's entries is checked whole:
    applying part of it would leave a gap in the node's versions.
    """

    def __init__(self, limits: Limits, rejections: Rejections) -> None:
        self.limits = limits
        self.rejections = rejections

    def refuse(self, reason: str, detail: str, subject: str = "") -> bool:
        """Count a refusal (``detail`` a constant: this runs per packet); returns False."""
        self.rejections.add(reason, detail, subject)
        return False

    def names_fit(self, node_id: str, addr: str) -> bool:
        """A node id and gossip address within the key and value sizes."""
        if text_size(node_id) > self.limits.max_key_size:
            return self.refuse("key_size", "node id over gossip.max_key_size", node_id[:64])
        if text_size(addr) > self.limits.max_value_size:
            return self.refuse("value_size", "address over gossip.max_value_size", node_id)
        return True

    def chunk_fits(self, delta: NodeDelta) -> bool:
        """The chunk's names, keys and values within the sizes."""
        if not self.names_fit(delta.id, delta.addr):
            return False
        max_key, max_value = self.limits.max_key_size, self.limits.max_value_size
        for e in delta.entries:
            if text_size(e.key) > max_key:
                return self.refuse("key_size", "key over gossip.max_key_size", delta.id)
            if text_size(e.value) > max_value:
                return self.refuse("value_size", "value over gossip.max_value_size", delta.id)
        return True

    def step_fits(self, delta: NodeDelta, version: int) -> bool:
        """The chunk moves the node's version at most ``max_version_step`` past ``version``."""
        # A version far above what we hold would make us ignore the node's real entries until
        # it caught up (2^64 - 1: forever). Its own versions never jump that far.
        top = max((e.version for e in delta.entries), default=version)
        if top - version > self.limits.max_version_step:
            return self.refuse(
                "version_step", "version jump over gossip.max_version_step", delta.id
            )
        return True

    def count_fits(self, delta: NodeDelta, held: dict[str, Entry], version: int) -> bool:
        """The node holds at most ``max_entries_per_node`` once the chunk is applied."""
        cap = self.limits.max_entries_per_node
        added = {e.key for e in delta.entries if e.key not in held}
        if len(held) + len(added) <= cap or _count_after(held, version, delta) <= cap:
            return True
        return self.refuse("max_entries", "node over gossip.max_entries_per_node", delta.id)


def _count_after(held: dict[str, Entry], version: int, delta: NodeDelta) -> int:
    """How many entries a node holds once the chunk is applied, a compaction marker included."""
    versions = {key: e.version for key, e in held.items()}
    for e in sorted(delta.entries, key=lambda e: e.version):
        if e.version <= version:
            continue
        versions[e.key] = e.version
        if e.internal and e.key == COMPACT_KEY and e.value.isdigit():
            upto = int(e.value)
            versions = {k: v for k, v in versions.items() if v > upto}
    return len(versions)
