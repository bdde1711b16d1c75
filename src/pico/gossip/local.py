"""The local node's own gossip state: what it publishes, versioned within its incarnation.

Every change bumps the version and stamps the entry with it; tombstones are compacted away.
When the versions would pass what peers accept in one step, or when peers hold a newer life of
our id (a refutation), the node starts a new incarnation: tombstones dropped, the surviving
entries re-versioned from 1, and peers replace what they held of it at once (sans-I/O).
"""

from __future__ import annotations

from pico.gossip.limits import Limits
from pico.gossip.records import COMPACT_KEY, LEFT_KEY, Entry, NodeRecord, newer, next_incarnation


class LocalNode:
    """The record of the local node, and the only code that changes it."""

    def __init__(self, record: NodeRecord, limits: Limits, compact_threshold: int) -> None:
        if not 0 <= record.incarnation < 1 << 64:
            raise ValueError("an incarnation is a uint64")
        self.record = record
        self.limits = limits
        self.compact_threshold = compact_threshold

    def upsert(self, key: str, value: str, *, internal: bool = False) -> None:
        """Set a key; a no-op if the value is unchanged.

        Raises ``ValueError`` for a new key once the node has as many entries as peers accept
        (``max_entries_per_node``, tombstones included, less room for the internal keys).
        """
        current = self.record.entries.get(key)
        if current is not None and not current.deleted and current.value == value:
            return
        if current is None and not internal:
            self._make_room(key)
        self._bump(key, value, internal=internal, deleted=False)

    def _make_room(self, key: str) -> None:
        # Peers hold at most max_entries_per_node of ours: keep two for the internal keys.
        room = self.limits.max_entries_per_node - 2
        if self._published() < room:
            return
        self.compact(force=True)
        if self._published() >= room:
            raise ValueError(
                f"cannot publish {key!r}: this node has {self._published()} gossip entries, "
                f"the most peers accept (gossip.max_entries_per_node)"
            )

    def _published(self) -> int:
        entries = self.record.entries
        return len(entries) - (LEFT_KEY in entries) - (COMPACT_KEY in entries)

    def delete(self, key: str) -> None:
        """Tombstone a key; a no-op if it is missing or already deleted."""
        current = self.record.entries.get(key)
        if current is None or current.deleted:
            return
        self._bump(key, "", internal=current.internal, deleted=True)

    def mark_left(self) -> None:
        """Mark the node left (adds the ``_internal:left`` entry); idempotent."""
        if self.record.left:
            return
        self.record.left = True
        self._bump(LEFT_KEY, "true", internal=True, deleted=False)

    def _bump(self, key: str, value: str, *, internal: bool, deleted: bool) -> None:
        record = self.record
        record.version += 1
        record.entries[key] = Entry(key, value, record.version, internal, deleted)
        self._renew_if_versions_run_out()

    def _renew_if_versions_run_out(self) -> None:
        # Peers refuse a version more than max_version_step above what they hold, and a peer
        # that has never heard of us holds 0: our versions must stay below it.
        if self.record.version > self.limits.max_version_step:
            self.renew(next_incarnation(self.record.incarnation))

    def compact(self, *, force: bool = False) -> bool:
        """Drop tombstones once there are ``compact_threshold`` of them (any, if ``force``).

        Survivors are re-versioned after the current version V and ``_internal:compact = "V"`` is
        added last, so peers drop everything they hold at or below V. Returns whether it compacted.
        """
        record = self.record
        tombstones = sum(1 for e in record.entries.values() if e.deleted)
        if tombstones < (1 if force else self.compact_threshold):
            return False
        base = record.version
        version = base
        entries: dict[str, Entry] = {}
        for e in self._survivors():
            version += 1
            entries[e.key] = Entry(e.key, e.value, version, e.internal, e.deleted)
        version += 1
        entries[COMPACT_KEY] = Entry(COMPACT_KEY, str(base), version, True, False)
        record.entries = entries
        record.version = version
        self._renew_if_versions_run_out()
        return True

    def renew(self, incarnation: int) -> None:
        """Start a new life: tombstones dropped, survivors re-versioned from 1."""
        record = self.record
        survivors = self._survivors()
        record.entries = {
            e.key: Entry(e.key, e.value, version, e.internal, e.deleted)
            for version, e in enumerate(survivors, start=1)
        }
        record.version = len(survivors)
        record.incarnation = incarnation

    def _survivors(self) -> list[Entry]:
        live = (e for e in self.record.entries.values() if not e.deleted and e.key != COMPACT_KEY)
        return sorted(live, key=lambda e: e.version)

    def outbid(self, incarnation: int, version: int) -> int | None:
        """The incarnation that refutes a peer's claim about our id, or None if it is not newer
        than what we are (a later life, or a version of this life we never reached)."""
        record = self.record
        if newer(incarnation, record.incarnation):
            return next_incarnation(incarnation)
        if incarnation == record.incarnation and version > record.version:
            return next_incarnation(incarnation)
        return None
