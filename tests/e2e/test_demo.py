"""`make demo` (`pico dev demo`): a 3-node cluster behind a load balancer, an agent, a service."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path

import psutil
import pytest

from tests.support.procs import PICO, REPO, Procs, http_get, shell, wait_until

pytestmark = pytest.mark.e2e


def listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@pytest.mark.parametrize("lb", ["builtin", "nginx"])
def test_demo_serves_the_getting_started_requests_and_stops_everything(
    procs: Procs, lb: str
) -> None:
    demo = procs.pico("dev", "demo", "--lb", lb, name=f"demo-{lb}")
    wait_until(lambda: "Press Ctrl-C to stop." in demo.output(), timeout=60, what="demo up")
    assert 'curl http://localhost:8000 -H "x-pico-endpoint: my-endpoint"' in demo.output()

    status, body = http_get("http://127.0.0.1:8000/", {"x-pico-endpoint": "my-endpoint"})
    assert status == 200 and b"Hello from the service behind Pico" in body
    by_host = shell(
        "curl -s --connect-to my-endpoint.example.com:8000:localhost:8000 "
        "http://my-endpoint.example.com:8000"
    )
    assert "Hello from the service behind Pico" in by_host.stdout
    wait_until(
        lambda: shell("pico status cluster nodes").stdout.count("status: active") == 3,
        what="three active nodes",
    )

    demo.signal(signal.SIGTERM)
    assert demo.wait(timeout=30) == 0
    # Every process it started is gone: nothing listens on the demo's addresses.
    for host, port in [("127.0.0.1", p) for p in (8000, 8001, 8002, 4000, 9000)] + [
        (f"127.0.0.{n}", p) for n in (11, 12, 13) for p in (8000, 8001, 8002)
    ]:
        assert not listening(host, port), f"{host}:{port} still open after the demo stopped"


class Demo:
    """`pico dev demo` in its own process group (as a shell runs it), and what it started."""

    def __init__(self, logdir: Path) -> None:
        self.log = (logdir / "demo.log").open("wb")
        self.popen = subprocess.Popen(
            [*PICO, "dev", "demo"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
        )
        self.log_path = logdir / "demo.log"
        wait_until(
            lambda: "Press Ctrl-C to stop." in self.log_path.read_text(errors="replace"),
            timeout=60,
            what="demo up",
        )
        self.children = psutil.Process(self.popen.pid).children(recursive=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def left_running(self) -> list[psutil.Process]:
        alive = []
        for child in self.children:
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
        return alive

    def kill_all(self) -> None:
        self.popen.kill()
        for proc in self.children:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self.popen.wait(timeout=10)
        self.log.close()


def stop_time(demo: Demo, how: str) -> float:
    """Stop the demo `how`; the seconds until it and everything it started are gone."""
    signals = {"group": signal.SIGINT, "int": signal.SIGINT, "term": signal.SIGTERM}
    start = time.monotonic()
    if how == "group":
        os.killpg(demo.popen.pid, signal.SIGINT)  # Ctrl-C in a terminal
    elif how == "kill":
        demo.popen.kill()
    else:
        os.kill(demo.popen.pid, signals[how])
    code = demo.popen.wait(timeout=10)
    wait_until(lambda: not demo.left_running(), timeout=10, what="every child of the demo gone")
    elapsed = time.monotonic() - start
    assert code == (-signal.SIGKILL if how == "kill" else 0), demo.output()[-2000:]
    return elapsed


@pytest.mark.parametrize("how", ["int", "term", "kill"])
def test_the_demo_stops_everything_within_two_seconds(tmp_path: Path, how: str) -> None:
    demo = Demo(tmp_path)
    try:
        names = sorted(p.name() for p in demo.children)
        assert len(names) >= 6, names  # service, 3 nodes, load balancer, agent (+ prometheus)
        elapsed = stop_time(demo, how)
        print(f"\ndemo stopped by {how} in {elapsed:.2f}s")
        assert elapsed <= 2.0
    finally:
        demo.kill_all()


def _query(expr: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:9090/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    status, body = http_get(url)
    assert status == 200, body[:300]
    result: list[dict[str, object]] = json.loads(body)["data"]["result"]
    return result


def grafana_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel in deploy/grafana, with Grafana's variables filled
    as a dashboard showing all instances does."""
    queries = []
    for path in sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        panels = []
        for panel in dashboard["panels"]:
            panels += [panel, *panel.get("panels", [])]
        for panel in panels:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", "30s")
                expr = expr.replace('=~"$instance"', '=~".+"')
                queries.append((f"{path.name}: {panel['title']}", expr))
    return queries


def test_the_demo_runs_prometheus_and_every_grafana_panel_has_data(tmp_path: Path) -> None:
    assert shutil.which("prometheus"), "prometheus is required (installed by .ci/run)"
    demo = Demo(tmp_path)
    try:
        assert "http://localhost:9090" in demo.output()
        for _ in range(30):  # through the load balancer: local and forwarded requests
            status, _ = http_get("http://127.0.0.1:8000/", {"x-pico-endpoint": "my-endpoint"})
            assert status == 200
        wait_until(
            lambda: sorted(str(r["value"][1]) for r in _query("up")) == ["1"] * 4,  # type: ignore[index]
            timeout=30,
            what="the three nodes and the agent scraped and up",
        )
        deadline = time.monotonic() + 30
        while missing := [title for title, expr in grafana_queries() if not _query(expr)]:
            assert time.monotonic() < deadline, f"panels without data after 30 s: {missing}"
            time.sleep(0.5)
        assert stop_time(demo, "group") <= 2.0
    finally:
        demo.kill_all()
