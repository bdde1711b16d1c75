"""Real processes for end-to-end tests: pico servers and agents, services, clients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
PICO = [sys.executable, "-m", "pico"]


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Poll `predicate` until true; raise AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what}")
        time.sleep(0.02)


def http_ok(url: str) -> bool:
    """True if GET `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET `url`; returns (status, body) also for error statuses, (0, b"") if unreachable."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""  # not reachable (yet)


class Proc:
    """A child process whose output goes to a log file; stopped by the test that started it."""

    def __init__(self, name: str, argv: list[str], logdir: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = logdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # From the repo root, so `python -m tests.support.serve` finds the test package.
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd or REPO, env=env
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit within `timeout`."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode


class Procs:
    """Every process a test starts; `stop_all()` stops them in reverse order."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> Proc:
        proc = Proc(name, argv, self.logdir, cwd)
        self.procs.append(proc)
        return proc

    def pico(self, *args: str, name: str = "") -> Proc:
        """Start `pico ARGS...` (named after its subcommand unless `name` is given)."""
        return self.start(name or args[0], [*PICO, *args])

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)

    def dump(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.output()[-3000:]}" for p in self.procs)


def server_args(
    ip: str, *extra: str, ports: tuple[int, int, int, int] = (8000, 8001, 8002, 8003)
) -> list[str]:
    """`pico server` flags binding every port on `ip`."""
    proxy, upstream, admin, gossip = ports
    return [
        "server",
        "--proxy.bind-addr",
        f"{ip}:{proxy}",
        "--upstream.bind-addr",
        f"{ip}:{upstream}",
        "--admin.bind-addr",
        f"{ip}:{admin}",
        "--gossip.bind-addr",
        f"{ip}:{gossip}",
        *extra,
    ]


@contextmanager
def rss_monitor(pid: int, interval: float = 0.05) -> Iterator[list[int]]:
    """Sample the RSS of `pid` while the block runs; the list gets the peak at index 0."""
    peak = [0]
    stop = threading.Event()
    proc = psutil.Process(pid)

    def sample() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], proc.memory_info().rss)
            except psutil.Error:
                return
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def shell(command: str) -> subprocess.CompletedProcess[str]:
    """Run a command line as a user types it, with our `pico` first on PATH."""
    bindir = str(Path(sys.executable).parent)
    return subprocess.run(
        command,
        shell=True,
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": f"{bindir}:/usr/bin:/bin"},
    )
