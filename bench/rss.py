"""Sampling peak RSS (every 100 ms) and CPU time of the processes under test, with psutil."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import psutil


@dataclass
class _Tracked:
    role: str
    root: psutil.Process
    cpu: dict[int, float] = field(default_factory=dict)  # pid -> user+system seconds, last seen
    cpu_start: dict[int, float] = field(default_factory=dict)
    peak_rss: int = 0


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class Sampler:
    """Peak RSS per role (sum over the role's process tree) and CPU seconds used while running."""

    def __init__(self, roles: dict[str, int], interval: float = 0.1) -> None:
        self._tracked = [_Tracked(role, psutil.Process(pid)) for role, pid in roles.items()]
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self, first: bool = False) -> None:
        for t in self._tracked:
            rss = 0
            for p in _tree(t.root):
                try:
                    with p.oneshot():
                        rss += p.memory_info().rss
                        times = p.cpu_times()
                except psutil.Error:
                    continue
                used = times.user + times.system
                t.cpu[p.pid] = used
                if first:
                    t.cpu_start[p.pid] = used
            t.peak_rss = max(t.peak_rss, rss)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> Sampler:
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def peak_rss(self) -> dict[str, int]:
        return {t.role: t.peak_rss for t in self._tracked}

    def cpu_seconds(self) -> dict[str, float]:
        return {
            t.role: sum(used - t.cpu_start.get(pid, 0.0) for pid, used in t.cpu.items())
            for t in self._tracked
        }
