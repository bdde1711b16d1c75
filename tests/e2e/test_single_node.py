"""End to end on one node: real `pico` processes, a real service, curl, the status CLI."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support.procs import (
    PICO,
    Procs,
    http_get,
    http_ok,
    rss_monitor,
    server_args,
    shell,
    wait_until,
)
from tests.support.services import pattern

pytestmark = pytest.mark.e2e

IP = "127.0.0.1"


def run(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


def start_node(procs: Procs, *extra: str) -> None:
    procs.pico(*server_args(IP, "--cluster.node-id-prefix", "pico-1-", *extra))
    wait_until(lambda: http_ok(f"http://{IP}:8002/ready"), what="node ready")


def test_getting_started_commands_work_on_one_node(procs: Procs, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "hello.txt").write_text("hello from the service\n")
    start_node(procs)
    procs.start("service", [sys.executable, "-m", "http.server", "4000", "--bind", IP], cwd=site)
    wait_until(lambda: http_ok(f"http://{IP}:4000/hello.txt"), what="service up")
    procs.pico("agent", "--endpoints", "my-endpoint/localhost:4000", "--admin.bind-addr", f"{IP}:0")

    def registered() -> bool:
        return shell("pico status proxy endpoints").stdout.startswith("endpoints:\n  my-endpoint:")

    wait_until(registered, what="endpoint registered")

    out = shell('curl -s http://localhost:8000 -H "x-pico-endpoint: my-endpoint"')
    assert "hello.txt" in out.stdout  # the directory listing
    out = shell(
        "curl -s --connect-to my-endpoint.example.com:8000:localhost:8000 "
        "http://my-endpoint.example.com:8000/hello.txt"
    )
    assert out.stdout == "hello from the service\n"

    nodes = shell("pico status cluster nodes")
    assert nodes.returncode == 0, nodes.stderr
    assert re.fullmatch(
        r"nodes:\n"
        r"- id: pico-1-[a-z0-9]{7}\n"
        r"  status: active\n"
        r"  proxy_addr: 127\.0\.0\.1:8000\n"
        r"  admin_addr: 127\.0\.0\.1:8002\n"
        r"  endpoints: 1\n"
        r"  upstreams: 1\n",
        nodes.stdout,
    ), nodes.stdout
    endpoints = shell("pico status proxy endpoints")
    assert re.fullmatch(r"endpoints:\n  my-endpoint:\n  - 127\.0\.0\.1:\d+\n", endpoints.stdout), (
        endpoints.stdout
    )
    node_id = nodes.stdout.split("id: ")[1].split("\n")[0]
    node = shell(f"pico status cluster node {node_id} -o json")
    assert '"my-endpoint": 1' in node.stdout


def test_status_cli_reports_unreachable_admin_and_exits_1() -> None:
    out = run(*PICO, "status", "cluster", "nodes", "--server.url", f"http://{IP}:1")
    assert out.returncode == 1
    assert out.stdout.startswith("failed to get cluster nodes: ")


def test_sigterm_drains_in_flight_request_and_exits_0(procs: Procs) -> None:
    start_node(procs, "--server.graceful-shutdown-timeout", "20s")
    procs.start("service", [sys.executable, "-m", "tests.support.serve", IP, "4100"])
    wait_until(lambda: http_ok(f"http://{IP}:4100/"), what="service up")
    procs.pico("agent", "--endpoints", f"slow/{IP}:4100", "--admin.bind-addr", f"{IP}:9101")
    wait_until(lambda: b"slow" in http_get(f"http://{IP}:8002/status/proxy/endpoints")[1])
    result: dict[str, tuple[int, bytes]] = {}

    def slow_request() -> None:
        result["slow"] = http_get(f"http://{IP}:8000/slow?delay=2", {"x-pico-endpoint": "slow"})

    client = threading.Thread(target=slow_request)
    client.start()
    server = procs.procs[0]
    # In flight once the agent has opened a connection to the service for it.
    wait_until(
        lambda: (
            b'pico_agent_active_streams{endpoint="slow"} 1.0'
            in http_get(f"http://{IP}:9101/metrics")[1]
        ),
        what="request in flight",
    )
    server.signal(signal.SIGTERM)
    wait_until(lambda: http_get(f"http://{IP}:8002/ready")[0] != 200, what="/ready is 503")
    client.join(timeout=30)
    assert result["slow"] == (200, b"slow")
    assert server.wait(timeout=30) == 0
    assert '"shutdown complete"' in server.output()


def test_port_in_use_exits_1_with_one_clear_line(procs: Procs) -> None:
    start_node(procs)
    out = run(*PICO, *server_args(IP))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "admin.bind_addr" in lines[0] and "cannot listen" in lines[0]


def test_bad_flag_value_exits_1_naming_the_key() -> None:
    out = run(*PICO, "server", "--proxy.timeout", "soon")
    assert out.returncode == 1
    assert "proxy.timeout" in out.stderr


def test_unknown_yaml_key_exits_1_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "pico.yaml"
    config.write_text("proxy:\n  bind_addr: 127.0.0.1:0\n  bnd_addr: x\n")
    out = run(*PICO, "server", "--config.path", str(config))
    assert out.returncode == 1
    assert "proxy.bnd_addr" in out.stderr


def test_agent_without_endpoints_exits_1() -> None:
    out = run(*PICO, "agent", "--admin.bind-addr", f"{IP}:0")
    assert out.returncode == 1
    assert "endpoints" in out.stderr


GIB = 1 << 30
RSS_LIMIT = 150 * 1024 * 1024


def test_1gib_download_and_upload_keep_node_memory_bounded(procs: Procs, tmp_path: Path) -> None:
    start_node(procs)
    server = procs.procs[0]
    procs.start("service", [sys.executable, "-m", "tests.support.serve", IP, "4101"])
    wait_until(lambda: http_ok(f"http://{IP}:4101/"), what="service up")
    procs.pico("agent", "--endpoints", f"big/{IP}:4101", "--admin.bind-addr", f"{IP}:0")
    wait_until(lambda: b"big" in http_get(f"http://{IP}:8002/status/proxy/endpoints")[1])

    with rss_monitor(server.pid) as peak:
        down = run(
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            "-H",
            "x-pico-endpoint: big",
            f"http://{IP}:8000/download?size={GIB}",
            timeout=300,
        )
    assert down.stdout == f"200 {GIB}", down.stdout + down.stderr
    print(f"\n1 GiB download: node RSS peaked at {peak[0] / 2**20:.0f} MiB")
    assert peak[0] < RSS_LIMIT, f"node RSS peaked at {peak[0] / 2**20:.0f} MiB during download"

    upload = tmp_path / "upload.bin"
    block = pattern(251 * 4096)  # whole periods, so consecutive blocks continue the pattern
    with upload.open("wb") as f:
        for _ in range(GIB // len(block) + 1):
            f.write(block)
        f.truncate(GIB)
    with rss_monitor(server.pid) as peak:
        up = run(
            "curl",
            "-s",
            "-T",
            str(upload),
            "-H",
            "x-pico-endpoint: big",
            "-H",
            "Expect:",
            f"http://{IP}:8000/count",
            timeout=300,
        )
    assert up.stdout == f"{GIB} ok", up.stdout + up.stderr
    print(f"1 GiB upload: node RSS peaked at {peak[0] / 2**20:.0f} MiB")
    assert peak[0] < RSS_LIMIT, f"node RSS peaked at {peak[0] / 2**20:.0f} MiB during upload"


def test_node_exits_1_when_no_member_can_be_joined(procs: Procs) -> None:
    node = procs.pico(
        *server_args("127.0.0.1", "--cluster.join", "127.0.0.1:1", "--cluster.join-timeout", "2s"),
        name="lonely",
    )
    assert node.wait(timeout=30) == 1
    output = node.output()
    assert "cluster.join: could not join any member: 127.0.0.1:1" in output


def test_agent_exits_1_when_the_server_rejects_it(procs: Procs) -> None:
    # A stand-in server answering the upgrade with 401, as a node with auth would.
    script = (
        "from aiohttp import web\n"
        "async def deny(r): return web.json_response({'error': 'invalid token'}, status=401)\n"
        "app = web.Application(); app.router.add_get('/{tail:.*}', deny)\n"
        "web.run_app(app, host='127.0.0.1', port=4102, print=None)\n"
    )
    procs.start("fake-server", [sys.executable, "-c", script])
    wait_until(lambda: http_get(f"http://{IP}:4102/")[0] == 401, what="fake server up")
    agent = procs.pico(
        "agent",
        "--endpoints",
        "ep/4000",
        "--server.url",
        f"http://{IP}:4102",
        "--admin.bind-addr",
        f"{IP}:0",
    )
    assert agent.wait(timeout=30) == 1
    assert "server rejected endpoint 'ep': 401 invalid token" in agent.output()


def test_agent_sigterm_lets_the_request_finish_and_exits_0(procs: Procs) -> None:
    start_node(procs)
    procs.start("service", [sys.executable, "-m", "tests.support.serve", IP, "4104"])
    wait_until(lambda: http_ok(f"http://{IP}:4104/"), what="service up")
    agent = procs.pico("agent", "--endpoints", f"slow/{IP}:4104", "--admin.bind-addr", f"{IP}:9102")
    wait_until(lambda: b"slow" in http_get(f"http://{IP}:8002/status/proxy/endpoints")[1])
    result: dict[str, tuple[int, bytes]] = {}
    client = threading.Thread(
        target=lambda: result.update(
            slow=http_get(f"http://{IP}:8000/slow?delay=2", {"x-pico-endpoint": "slow"})
        )
    )
    client.start()
    wait_until(
        lambda: (
            b'pico_agent_active_streams{endpoint="slow"} 1.0'
            in http_get(f"http://{IP}:9102/metrics")[1]
        ),
        what="request in flight",
    )
    agent.signal(signal.SIGTERM)
    # GoAway: the node stops routing to the agent at once, the request in flight finishes.
    wait_until(
        lambda: b"slow" not in http_get(f"http://{IP}:8002/status/proxy/endpoints")[1],
        what="endpoint unregistered",
    )
    client.join(timeout=30)
    assert result["slow"] == (200, b"slow")
    assert agent.wait(timeout=30) == 0
