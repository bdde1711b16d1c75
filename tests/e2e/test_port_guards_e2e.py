"""A real `pico server` under a slowloris crowd on its admin port, started with a low soft
limit of open files (issue 10, item 7): the node raises the limit, caps the admin port, and
its proxy keeps serving."""

from __future__ import annotations

import json
import socket
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.procs import Procs, http_get, http_ok, server_args, wait_until

pytestmark = pytest.mark.e2e

IP = "127.0.0.41"


def soft_fd_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open files limit")


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs /proc")
def test_a_slowloris_crowd_on_the_admin_port_leaves_the_proxy_serving(procs: Procs) -> None:
    # The soft limit a login shell often has (1024), scaled down: 256 file descriptors.
    node = procs.start(
        "pico",
        [
            "sh",
            "-c",
            'ulimit -Sn 256 && exec "$0" "$@"',
            sys.executable,
            "-m",
            "pico",
            *server_args(IP, "--admin.max-connections", "64"),
        ],
    )
    wait_until(lambda: http_ok(f"http://{IP}:8002/ready"), what="node ready")
    hard = int(Path("/proc/self/limits").read_text().split("Max open files")[1].split()[1])
    assert soft_fd_limit(node.pid) == hard
    with ExitStack() as stack:
        for _ in range(300):  # slowloris: heads that never end
            sock = stack.enter_context(socket.create_connection((IP, 8002)))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        served = 0
        for _ in range(57):
            status, body = http_get(f"http://{IP}:8000/", {"x-pico-endpoint": "nobody"})
            served += status == 502 and b"no available upstreams" in body
        probe, _ = http_get(f"http://{IP}:8002/health")
    print(f"\nslowloris x300 on admin: {served} of 57 proxy requests answered")
    assert served == 57
    assert probe == 200
    lines = [json.loads(x) for x in node.output().splitlines() if x.startswith("{")]
    limit_lines = [r for r in lines if r["msg"] == "open file limit"]
    assert [r["soft-limit"] for r in limit_lines] == [hard]
