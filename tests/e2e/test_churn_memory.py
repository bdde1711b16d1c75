"""Memory comes back after tunnels close: a node that served 1,000 tunnels returns to where it
started (it once kept a 1 MiB read buffer for every tunnel that closed: 1.2 GB after 1,300).
An idle tunnel costs the node at most IDLE_TUNNEL_COST (DESIGN §7: 50 KB); about 12 KB today."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request

import psutil
import pytest

from pico.mux.handshake import open_websocket
from tests.support.procs import Procs, http_ok, server_args, wait_until

pytestmark = pytest.mark.e2e

IP = "127.0.0.31"
IDLE_TUNNEL_COST = 50_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((IP, 0))
        return int(sock.getsockname()[1])


async def open_tunnels(port: int, n: int, prefix: str) -> list[asyncio.Transport]:
    transports = []
    for i in range(n):
        transport, _ = await open_websocket(f"ws://{IP}:{port}/pico/v1/upstream/{prefix}{i}")
        transports.append(transport)
    return transports


def test_rss_returns_after_a_thousand_tunnels_close(procs: Procs) -> None:
    ports = (free_port(), free_port(), free_port(), free_port())
    node = procs.pico(*server_args(IP, "--log.level", "error", ports=ports), name="node")
    wait_until(lambda: http_ok(f"http://{IP}:{ports[2]}/ready"), what="node ready")
    rss = psutil.Process(node.pid).memory_info
    before = rss().rss

    async def churn() -> int:
        for round_ in range(5):  # tunnels that come and go, 200 at a time
            for transport in await open_tunnels(ports[1], 200, f"c{round_}-"):
                transport.close()
        tunnels = await open_tunnels(ports[1], 1000, "all-")  # 1,000 at once, closed at once
        peak = rss().rss
        for transport in tunnels:
            transport.close()
        return peak

    peak = asyncio.run(churn())
    wait_until(
        lambda: http_ok(f"http://{IP}:{ports[2]}/ready") and registered(ports[2]) == 0,
        what="every tunnel gone from the node",
    )
    after = rss().rss
    print(f"\nnode RSS: {before / 1e6:.0f} MB at start, {peak / 1e6:.0f} MB with 1,000 tunnels, "
          f"{after / 1e6:.0f} MB after they closed")  # fmt: skip
    assert after - before < 50e6
    per_tunnel = (peak - before) / 1000
    assert per_tunnel <= IDLE_TUNNEL_COST, f"an idle tunnel costs the node {per_tunnel:,.0f} bytes"


def registered(admin_port: int) -> int:
    """Endpoints with a tunnel on the node."""
    with urllib.request.urlopen(f"http://{IP}:{admin_port}/status/proxy/endpoints") as resp:
        return len(json.loads(resp.read()))
