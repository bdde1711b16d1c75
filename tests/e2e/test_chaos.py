"""Chaos: a 3-node cluster behind nginx, two agents for one endpoint, a steady client, and in
turn every way a machine fails. Kills and restarts must fail no request; a freeze may fail at
most the requests in flight when it happened."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pico.devtools.nginx import nginx_binary
from pico.devtools.nginx import render as render_nginx
from tests.support.procs import Proc, Procs, http_get, http_ok, server_args, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

LB = "127.0.0.50"
NODES = ("127.0.0.51", "127.0.0.52", "127.0.0.53")
JOIN = ",".join(f"{ip}:8003" for ip in NODES)
SERVICE = ("127.0.0.1", 4150)
CLIENTS = 2  # threads sending requests back to back: at most this many in flight


@dataclass
class Traffic:
    """Requests sent through the load balancer by CLIENTS threads, with when and how each
    ended."""

    results: list[tuple[float, float, int]] = field(default_factory=list)  # start, end, status
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            status, _ = http_get(f"http://{LB}:8000/", {"x-pico-endpoint": "ep"})
            self.results.append((start, time.monotonic(), status))

    def failed_between(self, start: float, end: float) -> list[int]:
        return [s for t0, _, s in list(self.results) if start <= t0 < end and s != 200]

    def in_flight_at(self, moment: float) -> int:
        return sum(1 for t0, t1, _ in list(self.results) if t0 <= moment < t1)

    def recovered(self, since: float, count: int = 20) -> bool:
        recent = [s for t0, _, s in list(self.results) if t0 > since]
        return len(recent) >= count and all(s == 200 for s in recent[-count:])


def start_node(procs: Procs, i: int, generation: int) -> Proc:
    ip = NODES[i]
    proc = procs.pico(
        *server_args(
            ip,
            "--cluster.node-id", f"chaos-{i + 1}",
            "--cluster.join", JOIN,
            "--server.graceful-shutdown-timeout", "5s",
            "--upstream.heartbeat-interval", "1s",
            "--upstream.heartbeat-timeout", "2s",
            "--log.level", "warn",
        ),
        name=f"chaos-{i + 1}-{generation}",
    )  # fmt: skip
    wait_until(lambda: http_ok(f"http://{ip}:8002/ready"), what=f"{ip} ready")
    return proc


def start_agent(procs: Procs, name: str) -> Proc:
    return procs.pico(
        "agent",
        "--endpoints", f"ep/{SERVICE[0]}:{SERVICE[1]}",
        "--server.url", f"http://{LB}:8001",
        "--server.heartbeat-interval", "1s",
        "--admin.bind-addr", "127.0.0.1:0",
        "--log.level", "warn",
        name=name,
    )  # fmt: skip


def upstreams() -> dict[str, int]:
    """Tunnels of `ep` on each node that answers."""
    out = {}
    for ip in NODES:
        status, body = http_get(f"http://{ip}:8002/status/proxy/endpoints")
        if status == 200:
            out[ip] = len(json.loads(body).get("ep", []))
    return out


def tunnels_up(n: int = 2) -> bool:
    counts = upstreams()
    return len(counts) == 3 and sum(counts.values()) == n


def test_kills_freezes_and_restarts_fail_no_request(procs: Procs, tmp_path: Path) -> None:
    nginx = nginx_binary()
    assert nginx is not None, "nginx is required (installed by .ci/run)"
    nodes = [start_node(procs, i, 0) for i in range(3)]
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    conf = render_nginx(prefix, NODES, listen=LB)
    procs.start("nginx", [nginx, "-c", str(conf), "-p", str(prefix)])
    wait_until(lambda: http_ok(f"http://{LB}:8002/ready"), what="load balancer up")
    procs.start("service", [sys.executable, "-m", "tests.support.serve", *map(str, SERVICE)])
    wait_until(lambda: http_ok(f"http://{SERVICE[0]}:{SERVICE[1]}/"), what="service up")
    agents = [start_agent(procs, "agent-1"), start_agent(procs, "agent-2")]
    wait_until(tunnels_up, what="two tunnels for ep")

    traffic = Traffic()
    threads = [threading.Thread(target=traffic.run) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    report: list[str] = []
    failures: dict[str, tuple[int, int]] = {}  # event -> (failed, allowed)

    def event(name: str, act: object, allowed_in_flight: bool = False) -> None:
        wait_until(lambda: traffic.recovered(time.monotonic() - 60), timeout=30, what="steady")
        at = time.monotonic()
        act()  # type: ignore[operator]
        wait_until(tunnels_up, timeout=30, what=f"two tunnels again after {name}")
        wait_until(lambda: traffic.recovered(at), timeout=30, what=f"requests succeed after {name}")
        failed = traffic.failed_between(at - 0.5, time.monotonic())
        # Requests in flight when the machine froze (known once they ended).
        allowed = traffic.in_flight_at(at) if allowed_in_flight else 0
        failures[name] = (len(failed), allowed)
        report.append(f"{name}: {len(failed)} failed (allowed {allowed}) {sorted(set(failed))}")

    def holder() -> int:
        counts = upstreams()
        return next(i for i, ip in enumerate(NODES) if counts.get(ip, 0) > 0)

    def kill_node() -> None:
        i = holder()
        nodes[i].signal(signal.SIGKILL)
        nodes[i].wait(10)
        nodes[i] = start_node(procs, i, 1)

    def freeze_node() -> None:
        i = holder()
        nodes[i].signal(signal.SIGSTOP)
        time.sleep(3)  # the freeze itself (how long the machine stops), not a wait for a result
        nodes[i].signal(signal.SIGCONT)

    def kill_agent() -> None:
        agents[0].signal(signal.SIGKILL)
        agents[0].wait(10)
        wait_until(lambda: tunnels_up(1), what="the killed agent's tunnel gone")
        agents[0] = start_agent(procs, "agent-1b")

    def freeze_agent() -> None:
        agents[1].signal(signal.SIGSTOP)
        # Out of rotation once its heartbeats stop (1 s interval, 2 s timeout).
        wait_until(lambda: tunnels_up(1), timeout=15, what="the frozen agent out of rotation")
        agents[1].signal(signal.SIGCONT)

    def restart_node_same_id() -> None:
        i = holder()
        assert nodes[i].stop(timeout=15) == 0
        nodes[i] = start_node(procs, i, 2)

    try:
        event("SIGKILL of the node holding a tunnel", kill_node)
        event("SIGSTOP/SIGCONT of the node holding a tunnel", freeze_node, allowed_in_flight=True)
        event("SIGKILL of an agent", kill_agent)
        event("SIGSTOP of an agent", freeze_agent, allowed_in_flight=True)
        event("restart of a node with the same id", restart_node_same_id)
    finally:
        traffic.stop.set()
        for thread in threads:
            thread.join()
        for agent in agents:
            agent.signal(signal.SIGCONT)
        for node in nodes:
            node.signal(signal.SIGCONT)
    print(f"\nchaos ({len(traffic.results)} requests):\n  " + "\n  ".join(report))
    assert all(failed <= allowed for failed, allowed in failures.values()), report
