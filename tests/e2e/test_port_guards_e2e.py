"""A real `pico server` under a slowloris crowd on its admin port, started with a low soft
limit of open files (issue 10, item 7): the node raises the limit, caps the admin port, and
its proxy keeps serving."""

from __future__ import annotations

import json
import resource
import socket
import sys
from contextlib import ExitStack

import psutil
import pytest

from tests.support.procs import Procs, http_get, http_ok, server_args, wait_until

pytestmark = pytest.mark.e2e

IP = "127.0.0.41"


def with_soft_fd_limit(limit: int, *argv: str) -> list[str]:
    """`argv` run with a soft limit of `limit` open files (the hard limit unchanged)."""
    return ["sh", "-c", f'ulimit -Sn {limit} && exec "$0" "$@"', *argv]


def limit_records(output: str) -> list[object]:
    lines = [json.loads(x) for x in output.splitlines() if x.startswith("{")]
    return [r["soft-limit"] for r in lines if r["msg"] == "open file limit"]


def fd_limits(pid: int | None = None) -> tuple[int, int]:
    """The (soft, hard) limits of open files of a process (this one by default)."""
    if pid is None:
        return resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)
    return soft, hard


def test_a_slowloris_crowd_on_the_admin_port_leaves_the_proxy_serving(procs: Procs) -> None:
    # The soft limit a login shell often has (1024), scaled down: 256 file descriptors.
    node = procs.start(
        "pico",
        with_soft_fd_limit(
            256, sys.executable, "-m", "pico", *server_args(IP, "--admin.max-connections", "64")
        ),
    )
    wait_until(lambda: http_ok(f"http://{IP}:8002/ready"), what="node ready")
    hard = fd_limits()[1]
    assert fd_limits(node.pid) == (hard, hard)
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
    assert limit_records(node.output()) == [hard]  # logged once


def test_the_agent_raises_its_soft_limit_of_open_files(procs: Procs) -> None:
    agent = procs.start(
        "agent",
        with_soft_fd_limit(
            256,
            *(sys.executable, "-m", "pico", "agent", "--endpoints", "ep/127.0.0.1:1"),
            *("--server.url", f"http://{IP}:8001", "--admin.bind-addr", "127.0.0.1:0"),
        ),
    )
    wait_until(lambda: limit_records(agent.output()) != [], what="the agent logged its limit")
    hard = fd_limits()[1]
    assert limit_records(agent.output()) == [hard]
    assert fd_limits(agent.pid) == (hard, hard)
