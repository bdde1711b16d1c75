"""Failover without a lost request (issue 10, item 9): a 3-node cluster behind nginx, two
agents on one endpoint, a client sending GETs without pause, and round after round the node
holding a tunnel is killed with SIGKILL (then started again). No request may fail: one that
was on its way to the dying node is sent again elsewhere, or waits for the endpoint to be back.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.test_cluster_e2e import JOIN, NODES, nodes_view, start_cluster
from tests.support.procs import Proc, Procs, http_get, http_ok, server_args, wait_until

pytestmark = pytest.mark.e2e

ROUNDS = 4


def node_id_at(ip: str) -> str:
    """The id of the node listening on `ip` now, as it says itself."""
    status, body = http_get(f"http://{ip}:8002/status/cluster/nodes/local")
    return str(json.loads(body)["id"]) if status == 200 else ""


def upstreams_seen(by: str, ids: set[str]) -> int:
    """The upstreams of the nodes `ids` as `by` sees them (not those of a dead node it may
    still list)."""
    return sum(int(str(n["upstreams"])) for n in nodes_view(by) if n["id"] in ids)


def test_sigkill_of_a_tunnel_node_round_after_round_fails_no_request(
    procs: Procs, tmp_path: Path
) -> None:
    start_cluster(procs, tmp_path)
    nodes: dict[str, Proc] = dict(zip(NODES, procs.procs[: len(NODES)], strict=True))
    procs.start("service", [sys.executable, "-m", "tests.support.serve", "127.0.0.1", "4104"])
    wait_until(lambda: http_ok("http://127.0.0.1:4104/"), what="service up")
    for _ in range(2):  # through the load balancer, like users do
        procs.pico("agent", "--endpoints", "ep/127.0.0.1:4104", "--admin.bind-addr", "127.0.0.1:0")
    ids = {ip: node_id_at(ip) for ip in NODES}
    wait_until(
        lambda: all(upstreams_seen(ip, set(ids.values())) == 2 for ip in NODES),
        what="both tunnels gossiped to every node",
    )
    results: list[tuple[float, int, bytes]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, body = http_get("http://127.0.0.1:8000/", {"x-pico-endpoint": "ep"})
            results.append((time.monotonic(), status, body[:100]))

    thread = threading.Thread(target=client)
    thread.start()
    kills: list[float] = []
    try:
        wait_until(lambda: len(results) >= 20, what="client running")
        for round_no in range(ROUNDS):
            victim = next(ip for ip in NODES if upstreams_seen(NODES[0], {ids[ip]}) > 0)
            kills.append(time.monotonic())
            nodes[victim].signal(signal.SIGKILL)
            nodes[victim].wait(timeout=10)
            live = {ids[ip] for ip in NODES if ip != victim}
            witness = next(ip for ip in NODES if ip != victim)
            # The killed node's agent reconnects to a live node; both tunnels are served again.
            wait_until(
                lambda live=live, witness=witness: upstreams_seen(witness, live) == 2,
                timeout=30,
                what=f"round {round_no}: both tunnels on live nodes",
            )
            sent = len(results)
            wait_until(lambda sent=sent: len(results) >= sent + 20, what="traffic after the kill")
            # Start it again (a new node id), for the next round to have three nodes.
            nodes[victim] = procs.pico(
                *server_args(victim, "--cluster.node-id-prefix", "pico-r-", "--cluster.join", JOIN),
                name=f"pico-{victim}-{round_no}",
            )
            wait_until(lambda ip=victim: http_ok(f"http://{ip}:8002/ready"), what="restarted")
            ids[victim] = node_id_at(victim)
            wait_until(
                lambda ip=victim: upstreams_seen(ip, set(ids.values())) == 2,
                what="the restarted node sees both tunnels",
            )
            sent = len(results)
            wait_until(lambda sent=sent: len(results) >= sent + 20, what="traffic after restart")
    finally:
        stop.set()
        thread.join()
    failed = [(t, s, b) for t, s, b in results if s != 200]
    after_kill = [
        f"{s} {min(t - k for k in kills if k <= t) * 1000:.0f} ms after a kill: {b!r}"
        for t, s, b in failed
        if any(k <= t for k in kills)
    ]
    print(
        f"\nSIGKILL failover, {ROUNDS} rounds: {len(failed)} of {len(results)} requests failed"
        + "".join(f"\n  {line}" for line in after_kill[:20])
    )
    assert failed == []
