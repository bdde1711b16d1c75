"""Piko and frp beside Pico in `make bench`, when PICO_BENCH_PEERS names a folder holding their
binaries (`piko`, `frps`, `frpc`; ../shared/peers/bin has them). Command lines as in that
folder's README: access logs off, log level warn, on loopback like every other setup.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from bench.procs import BenchError, Proc, free_port, wait_until

if TYPE_CHECKING:
    from bench.run import Bench, Setup

PIKO_ONE = "piko one node"
PIKO_TWO = "piko two nodes (forwarded)"
FRP = "frp"
NAMES = (PIKO_ONE, PIKO_TWO, FRP)
PEER_HOST = "127.0.0.1"
_ENDPOINT = "bench"


def peers_dir() -> Path | None:
    """The folder PICO_BENCH_PEERS names, if it holds all three binaries (else BenchError)."""
    raw = os.environ.get("PICO_BENCH_PEERS", "")
    if not raw:
        return None
    folder = Path(raw).expanduser().resolve()
    missing = [b for b in ("piko", "frps", "frpc") if not os.access(folder / b, os.X_OK)]
    if missing:
        raise BenchError(f"PICO_BENCH_PEERS={raw}: no executable {', '.join(missing)} there")
    return folder


def _piko_server(bench: Bench, folder: Path, name: str, join: str = "") -> dict[str, int]:
    ports = {k: free_port(PEER_HOST) for k in ("proxy", "upstream", "admin", "gossip")}
    argv = [
        str(folder / "piko"), "server",
        "--cluster.node-id-prefix", f"{name}-",
        "--proxy.bind-addr", f"{PEER_HOST}:{ports['proxy']}",
        "--upstream.bind-addr", f"{PEER_HOST}:{ports['upstream']}",
        "--admin.bind-addr", f"{PEER_HOST}:{ports['admin']}",
        "--cluster.gossip.bind-addr", f"{PEER_HOST}:{ports['gossip']}",
        "--log.level", "warn",
        "--proxy.access-log.disable",
    ]  # fmt: skip
    if join:
        argv += ["--cluster.join", join]
    bench.procs.start(name, argv)
    return ports


def _piko_agent(bench: Bench, folder: Path, origin: Setup, upstream_port: int) -> Proc:
    return bench.procs.start(
        "piko-agent",
        [
            str(folder / "piko"), "agent", "http", _ENDPOINT, f"{origin.host}:{origin.port}",
            "--connect.url", f"http://{PEER_HOST}:{upstream_port}",
            "--log.level", "warn",
            "--access-log.disable",
        ],
    )  # fmt: skip


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((PEER_HOST, port)) == 0


def _ready(bench: Bench, what: str, port: int, headers: dict[str, str], procs: list[Proc]) -> None:
    from bench.run import probe_body

    wait_until(
        what,
        lambda: probe_body(PEER_HOST, port, headers),
        20,
        lambda: bench.procs.check_alive(*procs),
    )


def start_piko_one(bench: Bench, folder: Path, origin: Setup) -> Setup:
    from bench.run import Setup

    ports = _piko_server(bench, folder, "piko-a")
    server = bench.procs.procs[-1]
    agent = _piko_agent(bench, folder, origin, ports["upstream"])
    headers = {"x-piko-endpoint": _ENDPOINT}
    _ready(bench, "a 200 through Piko", ports["proxy"], headers, [server, agent])
    roles = {"server": server, "agent": agent, "origin": origin.roles["nginx"]}
    return Setup(PIKO_ONE, PEER_HOST, ports["proxy"], headers, roles, ["server", "agent"])


def start_piko_two(bench: Bench, folder: Path, origin: Setup) -> Setup:
    from bench.run import Setup

    ports_a = _piko_server(bench, folder, "piko-node-a")
    node_a = bench.procs.procs[-1]
    agent = _piko_agent(bench, folder, origin, ports_a["upstream"])
    ports_b = _piko_server(bench, folder, "piko-node-b", join=f"{PEER_HOST}:{ports_a['gossip']}")
    node_b = bench.procs.procs[-1]
    headers = {"x-piko-endpoint": _ENDPOINT}
    _ready(bench, "a 200 forwarded by Piko node B", ports_b["proxy"], headers, [node_a, node_b])
    roles = {"node B": node_b, "node A": node_a, "agent": agent, "origin": origin.roles["nginx"]}
    return Setup(
        PIKO_TWO, PEER_HOST, ports_b["proxy"], headers, roles, ["node B", "node A", "agent"]
    )


def start_frp(bench: Bench, folder: Path, origin: Setup) -> Setup:
    from bench.run import Setup

    bind, vhost = free_port(PEER_HOST), free_port(PEER_HOST)
    server_conf = bench.tmp / "frps.toml"
    server_conf.write_text(
        f'bindAddr = "{PEER_HOST}"\nbindPort = {bind}\nproxyBindAddr = "{PEER_HOST}"\n'
        f'vhostHTTPPort = {vhost}\nauth.method = "token"\nauth.token = "bench"\n'
        'log.to = "console"\nlog.level = "warn"\n'
    )
    client_conf = bench.tmp / "frpc.toml"
    client_conf.write_text(
        f'serverAddr = "{PEER_HOST}"\nserverPort = {bind}\nauth.method = "token"\n'
        'auth.token = "bench"\nlog.to = "console"\nlog.level = "warn"\n'
        f'[[proxies]]\nname = "bench"\ntype = "http"\nlocalIP = "{origin.host}"\n'
        f'localPort = {origin.port}\ncustomDomains = ["bench.local"]\n'
    )
    server = bench.procs.start("frps", [str(folder / "frps"), "-c", str(server_conf)])
    # frpc gives up at once if frps is not listening yet (loginFailExit).
    wait_until(
        "frps listening", lambda: _listening(bind), 10, lambda: bench.procs.check_alive(server)
    )
    client = bench.procs.start("frpc", [str(folder / "frpc"), "-c", str(client_conf)])
    headers = {"Host": "bench.local"}
    _ready(bench, "a 200 through frp", vhost, headers, [server, client])
    roles = {"frps": server, "frpc": client, "origin": origin.roles["nginx"]}
    return Setup(FRP, PEER_HOST, vhost, headers, roles, ["frps", "frpc"])


__all__ = ["FRP", "NAMES", "PIKO_ONE", "PIKO_TWO", "peers_dir", "start_frp", "start_piko_one"]
