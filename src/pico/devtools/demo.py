"""`make demo`: a local Pico with a sample service and an agent, stopped together on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

_SERVICE_PORT = 4000
_READY_TIMEOUT = 20.0


def _pico(*args: str) -> list[str]:
    return [sys.executable, "-m", "pico", *args]


def _wait_http(url: str, ok: Sequence[int] = (200,), timeout: float = _READY_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status in ok:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _wait_endpoint(admin: str, endpoint: str) -> bool:
    deadline = time.monotonic() + _READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{admin}/status/proxy/endpoints", timeout=1) as resp:
                if endpoint.encode() in resp.read():
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


class Processes:
    """Child processes started by the demo, stopped in reverse order."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], cwd: str | None = None) -> None:
        log = (self.logdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        self.procs.append((name, proc))

    def check(self) -> str | None:
        """The name of a process that exited, if any."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                return name
        return None

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_demo() -> int:
    """Start everything, print the commands to try, wait for Ctrl-C. Returns an exit code."""
    logdir = Path(tempfile.mkdtemp(prefix="pico-demo-"))
    site = logdir / "site"
    site.mkdir()
    (site / "index.html").write_text("<h1>Hello from the service behind Pico</h1>\n")
    procs = Processes(logdir)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        procs.start(
            "service",
            [sys.executable, "-m", "http.server", str(_SERVICE_PORT), "--bind", "127.0.0.1"],
            cwd=str(site),
        )
        procs.start(
            "pico-1",
            _pico(
                "server",
                "--cluster.node-id-prefix",
                "pico-1-",
                "--proxy.bind-addr",
                "127.0.0.1:8000",
                "--upstream.bind-addr",
                "127.0.0.1:8001",
                "--admin.bind-addr",
                "127.0.0.1:8002",
                "--gossip.bind-addr",
                "127.0.0.1:8003",
            ),
        )
        if not _wait_http("http://127.0.0.1:8002/ready"):
            return _failed(procs, logdir, "pico server did not become ready")
        procs.start(
            "agent",
            _pico(
                "agent",
                "--endpoints",
                f"my-endpoint/localhost:{_SERVICE_PORT}",
                "--server.url",
                "http://localhost:8001",
                "--admin.bind-addr",
                "127.0.0.1:9000",
            ),
        )
        if not _wait_endpoint("http://127.0.0.1:8002", "my-endpoint"):
            return _failed(procs, logdir, "the agent did not register my-endpoint")
        print(_BANNER.format(logdir=logdir), flush=True)
        while True:
            exited = procs.check()
            if exited:
                return _failed(procs, logdir, f"{exited} exited unexpectedly")
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    finally:
        procs.stop()


def _failed(procs: Processes, logdir: Path, why: str) -> int:
    print(f"demo failed: {why}; logs in {logdir}", file=sys.stderr)
    for name, _ in procs.procs:
        tail = (logdir / f"{name}.log").read_text(errors="replace").splitlines()[-5:]
        for line in tail:
            print(f"  {name}: {line}", file=sys.stderr)
    return 1


_BANNER = """
Pico demo is running:
  proxy    http://localhost:8000   (client requests)
  upstream http://localhost:8001   (agent tunnels)
  admin    http://localhost:8002   (metrics, status, health)
  service  http://localhost:4000   (python3 -m http.server), registered as endpoint my-endpoint

Try:
  curl http://localhost:8000 -H "x-pico-endpoint: my-endpoint"
  curl --connect-to my-endpoint.example.com:8000:localhost:8000 http://my-endpoint.example.com:8000
  .venv/bin/pico status cluster nodes
  .venv/bin/pico status proxy endpoints
  curl http://localhost:8002/metrics

Logs: {logdir}
Press Ctrl-C to stop.
"""
