"""Gossip input refused, counted by reason, and when each reason is due a warn log (sans-I/O).

A flood of bad packets must cost a counter increment each, never a log line each: the counts
feed ``pico_gossip_rejected_total{reason}``, and :meth:`Rejections.due` hands the transport at
most one warning per reason per ``every`` seconds, saying how many were refused since the last.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RejectionWarning:
    """What to log for one reason: how many were refused since its last warning, and the
    latest one's detail (``subject`` is the node id or key it was about, if any)."""

    reason: str
    count: int
    detail: str
    subject: str


class Rejections:
    """Counts of refused input by reason; ``counts`` may be a dict the caller exports."""

    def __init__(self, counts: dict[str, int] | None = None, *, every: float = 60.0) -> None:
        self.counts = counts if counts is not None else {}
        self.every = every
        self._unreported: dict[str, int] = {}
        self._latest: dict[str, tuple[str, str]] = {}
        self._warned_at: dict[str, float] = {}

    def add(self, reason: str, detail: str, subject: str = "") -> None:
        """Count one refusal. ``detail`` should be a constant string: this runs per packet."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self._unreported[reason] = self._unreported.get(reason, 0) + 1
        self._latest[reason] = (detail, subject)

    def due(self, now: float) -> list[RejectionWarning]:
        """Warnings to log now: reasons refused since their last warning, once per ``every``."""
        if not self._unreported:
            return []
        warnings = []
        for reason, count in list(self._unreported.items()):
            warned_at = self._warned_at.get(reason)
            if warned_at is not None and now - warned_at < self.every:
                continue
            detail, subject = self._latest[reason]
            warnings.append(RejectionWarning(reason, count, detail, subject))
            self._warned_at[reason] = now
            del self._unreported[reason]
        return warnings
