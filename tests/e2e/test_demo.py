"""`make demo` (`pico dev demo`): a 3-node cluster behind a load balancer, an agent, a service."""

from __future__ import annotations

import signal
import socket

import pytest

from tests.support.procs import Procs, http_get, shell, wait_until

pytestmark = pytest.mark.e2e


def listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@pytest.mark.parametrize("lb", ["builtin", "nginx"])
def test_demo_serves_the_getting_started_requests_and_stops_everything(
    procs: Procs, lb: str
) -> None:
    demo = procs.pico("dev", "demo", "--lb", lb, name=f"demo-{lb}")
    wait_until(lambda: "Press Ctrl-C to stop." in demo.output(), timeout=60, what="demo up")
    assert 'curl http://localhost:8000 -H "x-pico-endpoint: my-endpoint"' in demo.output()

    status, body = http_get("http://127.0.0.1:8000/", {"x-pico-endpoint": "my-endpoint"})
    assert status == 200 and b"Hello from the service behind Pico" in body
    by_host = shell(
        "curl -s --connect-to my-endpoint.example.com:8000:localhost:8000 "
        "http://my-endpoint.example.com:8000"
    )
    assert "Hello from the service behind Pico" in by_host.stdout
    wait_until(
        lambda: shell("pico status cluster nodes").stdout.count("status: active") == 3,
        what="three active nodes",
    )

    demo.signal(signal.SIGTERM)
    assert demo.wait(timeout=30) == 0
    # Every process it started is gone: nothing listens on the demo's addresses.
    for host, port in [("127.0.0.1", p) for p in (8000, 8001, 8002, 4000, 9000)] + [
        (f"127.0.0.{n}", p) for n in (11, 12, 13) for p in (8000, 8001, 8002)
    ]:
        assert not listening(host, port), f"{host}:{port} still open after the demo stopped"
