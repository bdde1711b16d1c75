"""TCP tunnels end to end: real `pico server`, `pico agent tcp|http`, `pico forward tcp`, Redis
and redis-cli, raw half-closing services, an https service, failover and the error lines.

Addresses 127.0.0.41-49 and 127.0.0.71 are this file's own (other e2e tests use .1 and
.11-.13).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import trustme

from tests.support.procs import (
    PICO,
    Proc,
    Procs,
    http_get,
    http_ok,
    rss_monitor,
    server_args,
    wait_until,
)

pytestmark = pytest.mark.e2e

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def needs_redis(test: Callable[..., None]) -> Callable[..., None]:
    """Fails (never skips) without Redis: .ci/run installs it, so a missing one is a broken
    machine, not a reason to test less."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        assert REDIS_SERVER is not None and REDIS_CLI is not None, (
            "redis-server and redis-cli are required: apt-get install redis-server redis-tools"
        )
        test(*args, **kwargs)

    return run


def start_node(procs: Procs, ip: str, *extra: str, name: str = "") -> Proc:
    proc = procs.pico(*server_args(ip, *extra), name=name or f"node-{ip}")
    wait_until(lambda: http_ok(f"http://{ip}:8002/ready"), what=f"node {ip} ready")
    return proc


def endpoint_listed(ip: str, endpoint: str) -> bool:
    status, body = http_get(f"http://{ip}:8002/status/proxy/endpoints")
    return status == 200 and endpoint in json.loads(body)


def start_forward(procs: Procs, local: str, endpoint: str, server: str, *extra: str) -> Proc:
    proc = procs.pico(
        "forward", "tcp", local, endpoint, "--server.url", server, *extra, name=f"fwd-{endpoint}"
    )
    wait_until(lambda: '"forwarding"' in proc.output(), what=f"forward to {endpoint} listening")
    return proc


def start_redis(procs: Procs, ip: str, port: int) -> None:
    assert REDIS_SERVER is not None and REDIS_CLI is not None
    procs.start(
        "redis",
        [REDIS_SERVER, "--bind", ip, "--port", str(port), "--save", "", "--appendonly", "no"],
    )
    wait_until(lambda: redis_cli(ip, port, "PING") == "PONG", what="redis up", timeout=20)


def redis_cli(ip: str, port: int, *command: str) -> str:
    assert REDIS_CLI is not None
    out = subprocess.run(
        [REDIS_CLI, "-h", ip, "-p", str(port), *command],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return out.stdout.strip()


def pico_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `pico ARGS` (this checkout's) and capture its output."""
    return subprocess.run([*PICO, *args], capture_output=True, text=True, timeout=30)


def exchange(addr: tuple[str, int], payload: bytes, *, timeout: float = 20) -> bytes:
    """Send `payload`, half-close, and read until the other side closes."""
    with socket.create_connection(addr, timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


@needs_redis
def test_redis_behind_an_agent_through_pico_forward_on_one_node(procs: Procs) -> None:
    ip = "127.0.0.41"
    start_node(procs, ip)
    start_redis(procs, ip, 6441)
    procs.pico(
        "agent", "tcp", "my-db", f"{ip}:6441",
        "--server.url", f"http://{ip}:8001", "--admin.bind-addr", f"{ip}:0",
    )  # fmt: skip
    wait_until(lambda: endpoint_listed(ip, "my-db"), what="my-db registered")
    start_forward(procs, f"{ip}:6000", "my-db", f"http://{ip}:8000")
    assert redis_cli(ip, 6000, "SET", "greeting", "hello") == "OK"
    assert redis_cli(ip, 6000, "GET", "greeting") == "hello"
    assert redis_cli(ip, 6441, "GET", "greeting") == "hello"  # it is the real one
    # One access-log line per connection on the node, with the bytes of each direction.
    node = procs.procs[0]
    wait_until(lambda: node.output().count('"tcp connection"') == 2, what="access log lines")
    lines = [json.loads(x) for x in node.output().splitlines() if '"tcp connection"' in x]
    # SET greeting hello: 38 bytes of RESP in, +OK\r\n out; GET greeting: 27 in, $5 hello 11 out.
    assert [(x["endpoint-id"], x["bytes-in"], x["bytes-out"]) for x in lines] == [
        ("my-db", 38, 5),
        ("my-db", 27, 11),
    ]
    assert all(x["client-ip"] and x["duration"] >= 0 for x in lines)
    assert http_get(f"http://{ip}:8002/metrics")[0] == 200
    body = http_get(f"http://{ip}:8002/metrics")[1]
    assert b"pico_tcp_connections_total 2.0" in body
    assert b'pico_tcp_bytes_total{direction="in"} 65.0' in body


@needs_redis
def test_redis_through_a_node_that_forwards_to_the_one_with_the_tunnel(
    procs: Procs, tmp_path: Path
) -> None:
    nodes = ("127.0.0.42", "127.0.0.43", "127.0.0.44")
    join = ",".join(f"{n}:8003" for n in nodes)
    for node in nodes:
        start_node(procs, node, "--cluster.join", join)
    start_redis(procs, "127.0.0.42", 6442)
    procs.start("web", [sys.executable, "-m", "tests.support.serve", "127.0.0.42", "4442"])
    wait_until(lambda: http_ok("http://127.0.0.42:4442/"), what="web service up")
    # One agent, listeners of both kinds from its config file.
    config = tmp_path / "agent.yaml"
    config.write_text(
        "listeners:\n"
        "  - {endpoint_id: my-db, addr: '127.0.0.42:6442', protocol: tcp, access_log: true}\n"
        "  - {endpoint_id: web, addr: 'http://127.0.0.42:4442', protocol: http, timeout: 5s}\n"
        "server: {url: 'http://127.0.0.42:8001'}\n"
        "admin: {bind_addr: '127.0.0.42:0'}\n"
    )
    agent = procs.pico("agent", "--config.path", str(config))
    wait_until(
        lambda: endpoint_listed("127.0.0.42", "my-db") and endpoint_listed("127.0.0.42", "web"),
        what="both listeners registered",
    )

    def gossiped() -> bool:
        status, body = http_get("http://127.0.0.44:8002/status/cluster/nodes")
        return status == 200 and any(n["endpoints"] == 2 for n in json.loads(body))

    wait_until(gossiped, what="node 3 knows who has my-db")
    start_forward(procs, "127.0.0.44:6000", "my-db", "http://127.0.0.44:8000")
    assert redis_cli("127.0.0.44", 6000, "SET", "k", "through-3") == "OK"
    assert redis_cli("127.0.0.44", 6000, "GET", "k") == "through-3"
    assert redis_cli("127.0.0.42", 6442, "GET", "k") == "through-3"
    assert http_get("http://127.0.0.44:8000/whoami", {"x-pico-endpoint": "web"}) == (
        200,
        b"service",
    )
    protocols = http_get("http://127.0.0.42:8002/status/proxy/protocols")
    assert (protocols[0], json.loads(protocols[1])) == (200, {"my-db": "tcp", "web": "http"})
    out = pico_cli("status", "proxy", "protocols", "--server.url", "http://127.0.0.42:8002")
    assert out.stdout == "protocols:\n  my-db: tcp\n  web: http\n", out.stdout + out.stderr
    # The seed's listing keeps its shape for both kinds.
    out = pico_cli("status", "proxy", "endpoints", "--server.url", "http://127.0.0.42:8002")
    assert re.fullmatch(
        r"endpoints:\n  my-db:\n  - 127\.0\.0\.1:\d+\n  web:\n  - 127\.0\.0\.1:\d+\n", out.stdout
    ), out.stdout
    wait_until(lambda: agent.output().count('"connection closed"') == 2, what="agent access log")


def test_half_close_works_in_both_directions_through_forward(procs: Procs) -> None:
    ip = "127.0.0.41"
    start_node(procs, ip)
    procs.start(
        "digest", [sys.executable, "-m", "tests.support.tcp_services", "digest", ip, "6451"]
    )
    procs.start("greet", [sys.executable, "-m", "tests.support.tcp_services", "greet", ip, "6452"])
    for endpoint, port in (("digest", 6451), ("greet", 6452)):
        procs.pico(
            "agent", "tcp", endpoint, f"{ip}:{port}",
            "--server.url", f"http://{ip}:8001", "--admin.bind-addr", f"{ip}:0",
            name=f"agent-{endpoint}",
        )  # fmt: skip
        wait_until(lambda endpoint=endpoint: endpoint_listed(ip, endpoint), what=endpoint)
    start_forward(procs, f"{ip}:6001", "digest", f"http://{ip}:8000")
    start_forward(procs, f"{ip}:6002", "greet", f"http://{ip}:8000")

    # Client FIN -> service: the service answers only after it read EOF.
    payload = hashlib.sha256(b"x").digest() * 100_000  # 3.2 MB
    answer = exchange((ip, 6001), payload)
    assert answer == b"%d %s\n" % (len(payload), hashlib.sha256(payload).hexdigest().encode())

    # Service FIN -> client, which keeps sending afterwards.
    with socket.create_connection((ip, 6002), timeout=20) as sock:
        got = b""
        while data := sock.recv(100):
            got += data
        assert got == b"hello"  # and then EOF, while our side is still open
        sock.sendall(b"after your FIN")
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the connection ends once both sides are done
    greet = next(p for p in procs.procs if p.name == "agent-greet")
    assert greet.popen.poll() is None


def test_https_service_behind_pico_agent_http(procs: Procs, tmp_path: Path) -> None:
    ip = "127.0.0.45"
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", ip)
    pem = tmp_path / "service.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    start_node(procs, ip)
    procs.start(
        "https-service", [sys.executable, "-m", "tests.support.https_serve", ip, "4443", str(pem)]
    )
    procs.pico(
        "agent", "http", "my-app", f"https://{ip}:4443", "--tls.root-ca", str(ca_pem),
        "--server.url", f"http://{ip}:8001", "--admin.bind-addr", f"{ip}:0",
    )  # fmt: skip
    wait_until(lambda: endpoint_listed(ip, "my-app"), what="my-app registered")
    wait_until(
        lambda: (
            http_get(f"http://{ip}:8000/whoami", {"x-pico-endpoint": "my-app"})
            == (200, b"https-service")
        ),
        what="the https service answers through the tunnel",
    )
    # Without the CA, the service's certificate is not trusted: nothing is sent to it.
    procs.pico(
        "agent", "http", "untrusted", f"https://{ip}:4443",
        "--server.url", f"http://{ip}:8001", "--admin.bind-addr", f"{ip}:0",
        name="agent-untrusted",
    )  # fmt: skip
    wait_until(lambda: endpoint_listed(ip, "untrusted"), what="untrusted registered")
    status, body = http_get(f"http://{ip}:8000/whoami", {"x-pico-endpoint": "untrusted"})
    assert (status, json.loads(body)) == (502, {"error": "upstream unreachable"})
    untrusted = next(p for p in procs.procs if p.name == "agent-untrusted")
    wait_until(lambda: "TLS to the service failed" in untrusted.output(), what="TLS error logged")


def test_tcp_client_reconnects_through_failover_within_upstream_wait(procs: Procs) -> None:
    lb_ip, a, b = "127.0.0.46", "127.0.0.47", "127.0.0.48"
    join = f"{a}:8003,{b}:8003"
    nodes = {ip: start_node(procs, ip, "--cluster.join", join) for ip in (a, b)}
    procs.pico(
        "dev", "lb",
        "--route", f"{lb_ip}:8000={a}:8000,{b}:8000",
        "--route", f"{lb_ip}:8001={a}:8001,{b}:8001",
        name="lb",
    )  # fmt: skip
    wait_until(lambda: _connectable((lb_ip, 8001)), what="load balancer up")
    procs.start("echo", [sys.executable, "-m", "tests.support.tcp_services", "echo", lb_ip, "6460"])
    procs.pico(
        "agent", "tcp", "echo", f"{lb_ip}:6460",
        "--server.url", f"http://{lb_ip}:8001", "--admin.bind-addr", f"{lb_ip}:0",
    )  # fmt: skip
    wait_until(lambda: endpoint_listed(a, "echo") or endpoint_listed(b, "echo"), what="echo")
    holder = a if endpoint_listed(a, "echo") else b
    other = b if holder == a else a

    def gossiped() -> bool:
        status, body = http_get(f"http://{other}:8002/status/cluster/nodes")
        return status == 200 and any(n["endpoints"] == 1 for n in json.loads(body))

    wait_until(gossiped, what="the other node knows the endpoint")
    start_forward(procs, f"{lb_ip}:6003", "echo", f"http://{lb_ip}:8000")
    assert exchange((lb_ip, 6003), b"before") == b"before"

    nodes[holder].signal(signal.SIGKILL)
    nodes[holder].wait(timeout=10)
    killed = time.monotonic()
    # The client's next connection reaches the live node, which holds it until the agent has
    # re-registered there (proxy.upstream_wait), then carries it.
    answer = b""
    while answer != b"after" and time.monotonic() - killed < 30:
        try:
            answer = exchange((lb_ip, 6003), b"after")
        except OSError:
            answer = b""
    assert answer == b"after"
    assert endpoint_listed(other, "echo")


def _connectable(addr: tuple[str, int]) -> bool:
    try:
        socket.create_connection(addr, timeout=1).close()
    except OSError:
        return False
    return True


SECRET = "e2e-secret-" + "s" * 64


def test_forward_logs_one_line_per_refused_connection(procs: Procs) -> None:
    ip = "127.0.0.49"
    start_node(procs, ip, "--proxy.auth.hmac-secret-key", SECRET)
    procs.start("service", [sys.executable, "-m", "tests.support.serve", ip, "4449"])
    wait_until(lambda: http_ok(f"http://{ip}:4449/"), what="service up")
    procs.pico(
        "agent", "--endpoints", f"web/{ip}:4449",
        "--server.url", f"http://{ip}:8001", "--admin.bind-addr", f"{ip}:0",
    )  # fmt: skip
    procs.start("echo", [sys.executable, "-m", "tests.support.tcp_services", "echo", ip, "6469"])
    procs.pico(
        "agent", "tcp", "my-db", f"{ip}:6469",
        "--server.url", f"http://{ip}:8001", "--admin.bind-addr", f"{ip}:0",
        name="agent-tcp",
    )  # fmt: skip
    wait_until(lambda: endpoint_listed(ip, "web") and endpoint_listed(ip, "my-db"), what="both")
    key = jwt.encode(
        {"exp": int(time.time() + 600), "pico": {"endpoints": ["web", "nobody", "my-db"]}},
        SECRET,
        algorithm="HS256",
    )
    cases = [
        ("nobody", 6010, ["--auth.api-key", key], "502 no available upstreams"),
        ("web", 6011, ["--auth.api-key", key], "400 endpoint is http"),
        ("my-db", 6012, [], "401"),
    ]
    for endpoint, port, extra, expected in cases:
        forward = start_forward(procs, f"{ip}:{port}", endpoint, f"http://{ip}:8000", *extra)
        assert exchange((ip, port), b"hi") == b""  # the connection is closed
        wanted = f"connection to {endpoint} failed: {expected}"
        wait_until(lambda f=forward, w=wanted: w in f.output(), what=wanted)
        errors = [x for x in forward.output().splitlines() if '"level":"error"' in x]
        assert len(errors) == 1, errors
    # With the token, the same endpoint works.
    start_forward(procs, f"{ip}:6013", "my-db", f"http://{ip}:8000", "--auth.api-key", key)
    assert exchange((ip, 6013), b"authorized") == b"authorized"


def echoes(addr: tuple[str, int]) -> bool:
    try:
        return exchange(addr, b"up", timeout=2) == b"up"
    except OSError:
        return False


def test_a_refusing_service_is_a_502_line_and_a_second_agent_takes_the_connections(
    procs: Procs,
) -> None:
    ip = "127.0.0.71"
    start_node(procs, ip)
    agent = ("--server.url", f"http://{ip}:8001", "--admin.bind-addr", f"{ip}:0")
    procs.pico("agent", "tcp", "my-db", f"{ip}:6479", *agent, name="agent-refused")  # no service
    wait_until(lambda: endpoint_listed(ip, "my-db"), what="the refusing agent registered")
    forward = start_forward(procs, f"{ip}:6071", "my-db", f"http://{ip}:8000")
    assert exchange((ip, 6071), b"hi") == b""  # closed: no upgrade, no bytes
    wanted = "connection to my-db failed: 502 upstream unreachable"
    wait_until(lambda: wanted in forward.output(), what=wanted)
    errors = [x for x in forward.output().splitlines() if '"level":"error"' in x]
    assert len(errors) == 1, errors
    # A second agent of the endpoint whose service answers: every connection reaches it, the
    # ones the refusing agent was tried for first included.
    procs.start("echo", [sys.executable, "-m", "tests.support.tcp_services", "echo", ip, "6471"])
    wait_until(lambda: echoes((ip, 6471)), what="the echo service up")
    procs.pico("agent", "tcp", "my-db", f"{ip}:6471", *agent, name="agent-echo")
    wait_until(
        lambda: (
            len(json.loads(http_get(f"http://{ip}:8002/status/proxy/endpoints")[1])["my-db"]) == 2
        ),
        what="two agents for my-db",
    )
    for i in range(4):
        assert exchange((ip, 6071), b"try %d" % i) == b"try %d" % i
    assert len([x for x in forward.output().splitlines() if '"level":"error"' in x]) == 1


GIB = 1 << 30
RSS_LIMIT = 150 * 1024 * 1024


def test_1gib_each_way_through_a_tcp_tunnel_keeps_node_memory_bounded(procs: Procs) -> None:
    ip = "127.0.0.41"
    node = start_node(procs, ip)
    procs.start("echo", [sys.executable, "-m", "tests.support.tcp_services", "echo", ip, "6470"])
    procs.pico(
        "agent", "tcp", "bulk", f"{ip}:6470",
        "--server.url", f"http://{ip}:8001", "--admin.bind-addr", f"{ip}:0",
    )  # fmt: skip
    wait_until(lambda: endpoint_listed(ip, "bulk"), what="bulk registered")
    forward = start_forward(procs, f"{ip}:6004", "bulk", f"http://{ip}:8000")
    block = hashlib.sha256(b"block").digest() * 32768  # 1 MiB
    sent = hashlib.sha256()
    received = hashlib.sha256()
    size = 0
    with socket.create_connection((ip, 6004), timeout=60) as sock:

        def send() -> None:
            for _ in range(GIB // len(block)):
                sock.sendall(block)
                sent.update(block)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        with rss_monitor(node.pid) as peak, rss_monitor(forward.pid) as forward_peak:
            sender.start()
            while data := sock.recv(1 << 20):
                received.update(data)
                size += len(data)
            sender.join()
    assert size == GIB
    assert received.hexdigest() == sent.hexdigest()
    print(f"\n1 GiB each way over TCP: node RSS peaked at {peak[0] / 2**20:.0f} MiB")
    assert peak[0] < RSS_LIMIT, f"node RSS peaked at {peak[0] / 2**20:.0f} MiB"
    # pico forward pauses each side while the other cannot take more: bounded too.
    assert forward_peak[0] < RSS_LIMIT, f"forward RSS peaked at {forward_peak[0] / 2**20:.0f} MiB"
