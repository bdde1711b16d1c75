"""End to end on a real 3-node cluster behind real nginx: the getting-started guide, verbatim,
and failover when the node holding the tunnel is killed with SIGKILL."""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from pico.devtools.nginx import nginx_binary
from pico.devtools.nginx import render as render_nginx
from tests.support.procs import Procs, http_get, http_ok, server_args, wait_until
from tests.support.procs import shell as run_shell

pytestmark = pytest.mark.e2e

NODES = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
JOIN = ",".join(f"{ip}:8003" for ip in NODES)
NGINX = nginx_binary()


def shell(command: str) -> str:
    """A command line's output, run as a user types it."""
    return run_shell(command).stdout


def start_cluster(procs: Procs, tmp_path: Path) -> None:
    assert NGINX is not None, "nginx is required (installed by .ci/run)"
    for i, ip in enumerate(NODES, start=1):
        procs.pico(
            *server_args(ip, "--cluster.node-id-prefix", f"pico-{i}-", "--cluster.join", JOIN),
            name=f"pico-{i}",
        )
    for ip in NODES:
        wait_until(lambda ip=ip: http_ok(f"http://{ip}:8002/ready"), what=f"{ip} ready")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    conf = render_nginx(prefix, NODES)
    procs.start("nginx", [NGINX, "-c", str(conf), "-p", str(prefix)])
    wait_until(lambda: http_ok("http://127.0.0.1:8002/ready"), what="load balancer up")


def nodes_view(ip: str) -> list[dict[str, object]]:
    status, body = http_get(f"http://{ip}:8002/status/cluster/nodes")
    return json.loads(body) if status == 200 else []


NODE_BLOCK = (
    r"- id: (pico-[123]-[a-z0-9]{{7}})\n"
    r"  status: active\n"
    r"  proxy_addr: 127\.0\.0\.1[123]:8000\n"
    r"  admin_addr: 127\.0\.0\.1[123]:8002\n"
    r"  endpoints: {n}\n"
    r"  upstreams: {n}\n"
)


def test_getting_started_guide_and_sigkill_failover(procs: Procs, tmp_path: Path) -> None:
    start_cluster(procs, tmp_path)
    wait_until(
        lambda: shell("pico status cluster nodes").count("status: active") == 3,
        what="three active nodes through the load balancer",
    )
    site = tmp_path / "site"
    site.mkdir()
    (site / "hello.txt").write_text("hello\n")
    procs.start(
        "service", [sys.executable, "-m", "http.server", "4000", "--bind", "127.0.0.1"], cwd=site
    )
    wait_until(lambda: http_ok("http://127.0.0.1:4000/hello.txt"), what="service up")
    procs.pico(
        "agent", "--endpoints", "my-endpoint/localhost:4000", "--admin.bind-addr", "127.0.0.1:9000"
    )

    # Every node sees the endpoint (gossip), whichever node the load balancer asks.
    wait_until(
        lambda: all(
            sum(int(n["endpoints"]) for n in nodes_view(ip)) == 1
            for ip in NODES  # type: ignore[call-overload]
        ),
        what="endpoint gossiped to every node",
    )
    out = shell("pico status cluster nodes")
    assert out.startswith("nodes:\n"), out
    with_endpoint = re.findall(NODE_BLOCK.format(n=1), out)
    without = re.findall(NODE_BLOCK.format(n=0), out)
    assert len(with_endpoint) == 1 and len(without) == 2, out
    owner = with_endpoint[0]

    endpoints = shell(f"pico status proxy endpoints --forward {owner}")
    assert re.fullmatch(r"endpoints:\n  my-endpoint:\n  - 127\.0\.0\.1:\d+\n", endpoints), endpoints

    for _ in range(6):  # the load balancer spreads these over all three nodes
        listing = shell('curl -s http://localhost:8000 -H "x-pico-endpoint: my-endpoint"')
        assert "hello.txt" in listing
        by_host = shell(
            "curl -s --connect-to my-endpoint.example.com:8000:localhost:8000 "
            "http://my-endpoint.example.com:8000/hello.txt"
        )
        assert by_host == "hello\n"

    # Failover: SIGKILL the node with the tunnel while a client keeps sending requests.
    owner_index = int(owner.split("-")[1]) - 1
    owner_ip = NODES[owner_index]
    results: list[tuple[float, int]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, _ = http_get(
                "http://127.0.0.1:8000/hello.txt", {"x-pico-endpoint": "my-endpoint"}
            )
            results.append((time.monotonic(), status))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(lambda: len(results) >= 20, what="client running")
        killed_at = time.monotonic()
        procs.procs[owner_index].signal(signal.SIGKILL)
        others = [ip for ip in NODES if ip != owner_ip]

        def peers_see_unreachable() -> bool:
            return all(
                any(n["id"] == owner and n["status"] == "unreachable" for n in nodes_view(ip))
                for ip in others
            )

        wait_until(peers_see_unreachable, timeout=15, what="peers mark the killed node unreachable")
        detected_after = time.monotonic() - killed_at

        def recovered() -> bool:
            recent = [s for t, s in results if t > time.monotonic() - 1.0]
            return len(recent) >= 5 and all(s == 200 for s in recent)

        wait_until(recovered, timeout=20, what="requests succeed again")
    finally:
        stop.set()
        thread.join()
    after = [(t, s) for t, s in results if t >= killed_at]
    failed = [(t, s) for t, s in after if s != 200]
    last_failure = max((t for t, _ in failed), default=killed_at) - killed_at
    print(
        f"\nfailover: {len(failed)} of {len(after)} requests failed "
        f"(statuses {sorted({s for _, s in failed})}); last failure {last_failure:.2f}s after "
        f"SIGKILL; peers marked the node unreachable after {detected_after:.2f}s"
    )
    assert last_failure < 10.0, f"requests failed for {last_failure:.1f}s after the kill"
    assert detected_after < 8.0
    # None is lost (issue 10, item 9): a GET on its way to the dying node is sent again, or
    # waits (`proxy.upstream_wait`) for the agent to reconnect elsewhere.
    assert failed == []


def owner_of(endpoint: str) -> str | None:
    """The id of the node holding a tunnel for `endpoint`, as the cluster sees it."""
    for ip in NODES:
        for node in nodes_view(ip):
            if node["status"] != "active":
                continue
            status, body = http_get(f"http://{ip}:8002/status/cluster/nodes/{node['id']}")
            if status == 200 and endpoint in (json.loads(body).get("endpoints") or {}):
                return str(node["id"])
    return None


def test_sigterm_moves_agents_without_failing_requests(procs: Procs, tmp_path: Path) -> None:
    start_cluster(procs, tmp_path)
    procs.start("service", [sys.executable, "-m", "tests.support.serve", "127.0.0.1", "4103"])
    wait_until(lambda: http_ok("http://127.0.0.1:4103/"), what="service up")
    procs.pico("agent", "--endpoints", "ep/127.0.0.1:4103", "--admin.bind-addr", "127.0.0.1:0")
    wait_until(
        lambda: all(
            sum(int(n["endpoints"]) for n in nodes_view(ip)) == 1  # type: ignore[call-overload]
            for ip in NODES
        ),
        what="endpoint gossiped to every node",
    )
    owner = owner_of("ep")
    assert owner is not None
    owner_index = int(owner.split("-")[1]) - 1
    results: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, body = http_get("http://127.0.0.1:8000/", {"x-pico-endpoint": "ep"})
            results.append(status)
            if status != 200:
                errors.append(f"{time.monotonic():.3f} {status} {body[:80]!r}")

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(lambda: len(results) >= 20, what="client running")
        procs.procs[owner_index].signal(signal.SIGTERM)
        assert procs.procs[owner_index].wait(timeout=30) == 0
        wait_until(
            lambda: (owner_of("ep") or owner) != owner, what="the agent moved to another node"
        )
        sent_before = len(results)
        wait_until(lambda: len(results) >= sent_before + 50, what="traffic after the move")
    finally:
        stop.set()
        thread.join()
    failed = [s for s in results if s != 200]
    print(f"\nSIGTERM of the tunnel's node: {len(failed)} of {len(results)} requests failed")
    print("\n".join(errors[:20]))
    assert failed == []
