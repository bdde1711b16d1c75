"""Rotating the gossip key by rolling restarts (the procedure SECURITY.md gives), on a real
3-node cluster behind nginx with a client sending requests all along: none may fail."""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from pico.devtools.nginx import nginx_binary
from pico.devtools.nginx import render as render_nginx
from tests.support.procs import Proc, Procs, http_get, http_ok, server_args, wait_until

pytestmark = pytest.mark.e2e

NODES = ("127.0.0.21", "127.0.0.22", "127.0.0.23")
JOIN = ",".join(f"{ip}:8003" for ip in NODES)


def start_node(procs: Procs, i: int, keys: list[str], generation: int) -> Proc:
    ip = NODES[i]
    proc = procs.pico(
        *server_args(
            ip,
            "--cluster.node-id-prefix", f"pico-{i + 1}-",
            "--cluster.join", JOIN,
            "--gossip.secret-keys", ",".join(keys),
            "--server.graceful-shutdown-timeout", "5s",
            "--log.level", "warn",
        ),
        name=f"pico-{i + 1}-gen{generation}",
    )  # fmt: skip
    wait_until(lambda: http_ok(f"http://{ip}:8002/ready"), what=f"{ip} ready")
    return proc


def active_peers(ip: str) -> set[str]:
    status, body = http_get(f"http://{ip}:8002/status/cluster/nodes")
    if status != 200:
        return set()
    return {str(n["proxy_addr"]) for n in json.loads(body) if n["status"] == "active"}


def served(ip: str) -> int:
    """Requests the node at `ip` has taken from clients for endpoint `ep`."""
    status, body = http_get(f"http://{ip}:8002/status/proxy/stats")
    if status != 200:
        return 0
    return int(json.loads(body)["endpoints"].get("ep", {}).get("requests", 0))


def endpoint_seen_everywhere() -> bool:
    for ip in NODES:
        status, body = http_get(f"http://{ip}:8002/status/cluster/nodes")
        active = [n for n in json.loads(body) if n["status"] == "active"]
        if status != 200 or sum(int(n["endpoints"]) for n in active) != 1:
            return False
    return True


def test_rotating_the_gossip_key_by_rolling_restarts_fails_no_request(
    procs: Procs, tmp_path: Path
) -> None:
    old, new = (base64.b64encode(os.urandom(32)).decode() for _ in range(2))
    nodes = [start_node(procs, i, [old], 0) for i in range(3)]
    everyone = {f"{ip}:8000" for ip in NODES}
    for ip in NODES:
        wait_until(lambda ip=ip: active_peers(ip) == everyone, what=f"{ip} sees the cluster")
    nginx = nginx_binary()
    assert nginx is not None, "nginx is required (installed by .ci/run)"
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    conf = render_nginx(prefix, NODES, listen="127.0.0.20")
    procs.start("nginx", [nginx, "-c", str(conf), "-p", str(prefix)])
    wait_until(lambda: http_ok("http://127.0.0.20:8002/ready"), what="load balancer up")
    procs.start("service", [sys.executable, "-m", "tests.support.serve", "127.0.0.1", "4104"])
    wait_until(lambda: http_ok("http://127.0.0.1:4104/"), what="service up")
    procs.pico(
        "agent", "--endpoints", "ep/127.0.0.1:4104", "--server.url", "http://127.0.0.20:8001",
        "--admin.bind-addr", "127.0.0.1:0",
    )  # fmt: skip
    wait_until(endpoint_seen_everywhere, what="endpoint gossiped to every node")

    results: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, body = http_get("http://127.0.0.20:8000/", {"x-pico-endpoint": "ep"})
            results.append(status)
            if status != 200:
                errors.append(f"{time.monotonic():.3f} {status} {body[:120]!r}")

    thread = threading.Thread(target=client)
    thread.start()
    phases = ([old, new], [new, old], [new])  # add the new key, make it first, drop the old
    try:
        wait_until(lambda: len(results) >= 20, what="client running")
        for generation, keys in enumerate(phases, start=1):
            for i in range(3):
                assert nodes[i].stop(timeout=15) == 0, nodes[i].output()[-2000:]
                nodes[i] = start_node(procs, i, keys, generation)
                # The restarted node hears, and is heard by, both others with its new ring.
                for ip in NODES:
                    wait_until(
                        lambda ip=ip: active_peers(ip) >= everyone, what=f"{ip} sees the cluster"
                    )
                wait_until(endpoint_seen_everywhere, what="endpoint gossiped to every node")
                # As a rolling update waits for a new pod to take traffic before it stops the
                # next: the load balancer sends to the restarted node again (nginx holds a node
                # that refused a connection out of rotation for fail_timeout).
                wait_until(lambda ip=NODES[i]: served(ip) >= 20, what=f"{NODES[i]} serves")
    finally:
        stop.set()
        thread.join()
    failed = [s for s in results if s != 200]
    print(f"\nkey rotation over 9 restarts: {len(failed)} of {len(results)} requests failed")
    assert failed == [], "\n".join(errors[:20])
