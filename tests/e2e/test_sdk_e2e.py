"""`pico.sdk` end to end: apps served from inside their own process (tests.support.sdk_apps)
behind real `pico server` processes, reached through another node with httpx, `websockets`
and raw sockets; `connect()` to a Redis behind `pico agent tcp`.

Addresses 127.0.0.60-69 are this file's own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
import websockets.sync.client

import pico.sdk
from tests.e2e.test_tcp_e2e import (
    _connectable,
    endpoint_listed,
    needs_redis,
    start_node,
    start_redis,
)
from tests.support.procs import Proc, Procs, http_get, rss_monitor, wait_until

pytestmark = pytest.mark.e2e

LB, A, B, CLIENT = "127.0.0.60", "127.0.0.61", "127.0.0.62", "127.0.0.64"
GIB = 1 << 30


def events(proc: Proc) -> list[dict[str, object]]:
    """The JSON event lines the app process printed."""
    lines = (line for line in proc.output().splitlines() if line.startswith('{"event"'))
    return [json.loads(line) for line in lines]


def event_names(proc: Proc) -> list[object]:
    return [e["event"] for e in events(proc)]


# Sealed gossip: a request one node forwards to the other carries a member's HMAC, so the
# second keeps the X-Forwarded-For of the first (on loopback, a node's outgoing connections
# come from 127.0.0.1, not from its own address, so it could not be trusted by address).
GOSSIP_KEY = base64.b64encode(b"k" * 32).decode()


def two_nodes(procs: Procs) -> None:
    join = f"{A}:8003,{B}:8003"
    for ip in (A, B):
        start_node(procs, ip, "--cluster.join", join, "--gossip.secret-keys", GOSSIP_KEY)


def knows_endpoint(ip: str, count: int = 1) -> bool:
    """`ip` has heard (by gossip, or locally) of `count` upstream(s) in the cluster."""
    status, body = http_get(f"http://{ip}:8002/status/cluster/nodes")
    return status == 200 and sum(int(n["upstreams"]) for n in json.loads(body)) >= count


def start_app(procs: Procs, kind: str, endpoint: str, upstream: str, *extra: str) -> Proc:
    argv = [sys.executable, "-m", "tests.support.sdk_apps", kind, endpoint, upstream, *extra]
    return procs.start(f"sdk-{kind}", argv)


def starlette_behind_a(procs: Procs) -> Proc:
    """Nodes A and B; the Starlette app registered on A; B knows it."""
    two_nodes(procs)
    app = start_app(procs, "starlette", "app", f"http://{A}:8001", f"http://{A}:8002")
    wait_until(lambda: "serving" in event_names(app), what="app serving")
    wait_until(lambda: knows_endpoint(B), what="B knows the endpoint")
    return app


@pytest.fixture
def http_b() -> Iterator[httpx.Client]:
    """A client of node B's proxy port, from CLIENT, on one keep-alive connection."""
    transport = httpx.HTTPTransport(local_address=CLIENT, limits=httpx.Limits(max_connections=1))
    with httpx.Client(
        base_url=f"http://{B}:8000",
        headers={"x-pico-endpoint": "app"},
        transport=transport,
        timeout=60,
    ) as client:
        yield client


def test_starlette_app_in_its_own_process_reached_through_another_node(
    procs: Procs, http_b: httpx.Client
) -> None:
    app = starlette_behind_a(procs)
    # JSON, with the client's address as the first node saw it.
    resp = http_b.get("/?n=0")
    assert resp.json() == {"hello": "world", "client": CLIENT, "scheme": "http", "n": "0"}
    # 100 keep-alive requests on the one connection.
    for n in range(1, 101):
        assert http_b.get(f"/?n={n}").json()["n"] == str(n)
    # SSE: each event arrives while the app waits to be asked for the next one.
    with httpx.Client(base_url=f"http://{B}:8000", headers={"x-pico-endpoint": "app"}) as other:
        with http_b.stream("GET", "/sse") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.iter_lines()
            for i in range(3):
                assert next(lines) == f"data: event {i}"
                assert next(lines) == ""
                if i < 2:
                    assert other.get("/sse/next").status_code == 200
    # WebSocket echo.
    with websockets.sync.client.connect(
        f"ws://{B}:8000/ws", additional_headers={"x-pico-endpoint": "app"}
    ) as ws:
        for message in ("hello", b"\x00binary", "x" * 100_000):
            ws.send(message)
            assert ws.recv() == message
    # A client that aborts: the app's receive() gives http.disconnect. Sent to A, the node
    # with the tunnel: B, when its client aborts, closes its connection to A with a FIN,
    # which A takes for a client that half-closed and still waits for its response.
    sock = socket.create_connection((A, 8000))
    sock.sendall(b"GET /disconnect HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: app\r\n\r\n")
    wait_until(lambda: "waiting" in event_names(app), what="request in the app")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    wait_until(lambda: "http.disconnect" in event_names(app), what="http.disconnect")
    # SIGTERM: drain, leave, lifespan shutdown; the startup ran before the endpoint existed.
    app.signal(signal.SIGTERM)
    assert app.wait(timeout=30) == 0
    names = event_names(app)
    assert names[:3] == ["startup", "registered-at-startup", "serving"]
    assert names[-2:] == ["shutdown", "closed"]
    assert events(app)[1] == {"event": "registered-at-startup", "registered": False}
    wait_until(lambda: not endpoint_listed(A, "app"), what="endpoint gone from A")


def test_a_gib_each_way_through_two_nodes_keeps_the_app_process_memory_bounded(
    procs: Procs, http_b: httpx.Client
) -> None:
    app = starlette_behind_a(procs)
    baseline = psutil.Process(app.pid).memory_info().rss
    started = time.monotonic()
    with rss_monitor(app.pid) as peak:
        got = 0
        with http_b.stream("GET", f"/download?size={GIB}") as resp:
            for chunk in resp.iter_raw(1 << 20):
                got += len(chunk)
        assert got == GIB
        download = time.monotonic() - started

        def body() -> Iterator[bytes]:
            chunk = b"u" * (1 << 20)
            for _ in range(GIB >> 20):
                yield chunk

        started = time.monotonic()
        assert http_b.post("/upload", content=body()).json() == {"received": GIB}
        upload = time.monotonic() - started
    print(f"1 GiB download {download:.1f}s, upload {upload:.1f}s, peak RSS {peak[0] >> 20} MiB")
    # Windows and buffers, not the body: the app's memory does not grow with it.
    assert peak[0] - baseline < 64 << 20


def app_behind_a_load_balancer(procs: Procs) -> tuple[Proc, dict[str, Proc], str, str]:
    """Nodes A and B behind a load balancer on LB:8001; the app registered through it.
    Returns (app, nodes by address, the node holding its tunnel, the other one)."""
    two_nodes(procs)
    nodes = {A: procs.procs[0], B: procs.procs[1]}
    procs.pico("dev", "lb", "--route", f"{LB}:8001={A}:8001,{B}:8001", name="lb")
    wait_until(lambda: _connectable((LB, 8001)), what="load balancer up")
    admins = f"http://{A}:8002,http://{B}:8002"
    app = start_app(procs, "starlette", "app", f"http://{LB}:8001", admins)
    wait_until(lambda: "serving" in event_names(app), what="app serving")
    holder = A if endpoint_listed(A, "app") else B
    other = B if holder == A else A
    wait_until(lambda: knows_endpoint(other), what="the other node knows the endpoint")
    return app, nodes, holder, other


def test_a_node_that_stops_gracefully_loses_no_request(procs: Procs) -> None:
    app, nodes, holder, other = app_behind_a_load_balancer(procs)
    headers = {"x-pico-endpoint": "app"}
    statuses: list[int] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=f"http://{other}:8000", headers=headers, timeout=30) as c:
            while not stop.is_set():
                statuses.append(c.get("/").status_code)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(lambda: len(statuses) > 20, what="requests flowing")
        # SIGTERM: the node sends GoAway; the app opens a new tunnel (through the load
        # balancer, to the other node) while its open streams finish on the old one.
        nodes[holder].signal(signal.SIGTERM)
        assert nodes[holder].wait(timeout=30) == 0
        wait_until(lambda: endpoint_listed(other, "app"), what="app moved to the other node")
        seen = len(statuses)
        wait_until(lambda: len(statuses) > seen + 20, what="requests flowing again")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert set(statuses) == {200}, sorted(set(statuses))
    assert app.popen.poll() is None


def test_node_killed_mid_request_the_app_reconnects_and_held_requests_succeed(
    procs: Procs,
) -> None:
    app, nodes, holder, other = app_behind_a_load_balancer(procs)
    headers = {"x-pico-endpoint": "app"}
    results: dict[str, httpx.Response | Exception] = {}

    def held() -> None:
        try:
            results["held"] = httpx.get(f"http://{other}:8000/held", headers=headers, timeout=30)
        except httpx.HTTPError as exc:
            results["held"] = exc

    thread = threading.Thread(target=held)
    thread.start()
    wait_until(lambda: "held" in event_names(app), what="request in the app")
    nodes[holder].signal(signal.SIGKILL)
    nodes[holder].wait(timeout=10)
    # Sent while the app has no tunnel: the node holds them until the app has reconnected
    # (through the load balancer, to the live node), then they succeed.
    for n in range(5):
        resp = httpx.get(f"http://{other}:8000/?n={n}", headers=headers, timeout=30)
        assert (resp.status_code, resp.json()["n"]) == (200, str(n))
    assert endpoint_listed(other, "app")
    assert app.popen.poll() is None  # the same process, reconnected
    # The request that was inside the dead node had no answer yet: the node that forwarded
    # it sends it again (a GET) once the app is back, and it succeeds.
    wait_until(lambda: event_names(app).count("held") == 2, what="held request sent again")
    assert http_get(f"http://{other}:8000/release", headers)[0] == 200
    thread.join(timeout=30)
    outcome = results["held"]
    assert isinstance(outcome, httpx.Response), outcome
    assert (outcome.status_code, outcome.text) == (200, "released")


def test_flask_app_through_run_in_its_own_process(procs: Procs) -> None:
    start_node(procs, A)
    app = start_app(procs, "flask", "legacy", f"http://{A}:8001")
    wait_until(lambda: endpoint_listed(A, "legacy"), what="legacy registered")
    headers = {"x-pico-endpoint": "legacy"}
    with httpx.Client(base_url=f"http://{A}:8000", headers=headers, timeout=30) as client:
        assert client.get("/").json()["hello"] == "flask"
        assert client.post("/echo", content=b"e" * 5_000_000).content == b"e" * 5_000_000
        assert client.get("/stream").text == "".join(f"line {i}\n" for i in range(5))
    app.signal(signal.SIGTERM)
    assert app.wait(timeout=30) == 0
    wait_until(lambda: not endpoint_listed(A, "legacy"), what="legacy gone")


def redis_behind_an_agent(procs: Procs, ip: str, port: int) -> None:
    """A Redis on ip:port, registered as TCP endpoint my-db on the node at `ip`."""
    start_redis(procs, ip, port)
    procs.pico(
        "agent", "tcp", "my-db", f"{ip}:{port}",
        "--server.url", f"http://{ip}:8001", "--admin.bind-addr", f"{ip}:0",
    )  # fmt: skip
    wait_until(lambda: endpoint_listed(ip, "my-db"), what="my-db registered")


@needs_redis
def test_connect_reaches_redis_behind_pico_agent_tcp(procs: Procs) -> None:
    ip = "127.0.0.65"
    start_node(procs, ip)
    redis_behind_an_agent(procs, ip, 6465)

    async def talk() -> list[bytes]:
        reader, writer = await pico.sdk.connect("my-db", url=f"http://{ip}:8000")
        try:
            answers = []
            for command in (b"PING", b"SET sdk hello", b"GET sdk"):
                writer.write(command + b"\r\n")
                line = await reader.readline()
                if line.startswith(b"$"):
                    line = await reader.readline()
                answers.append(line.strip())
            return answers
        finally:
            writer.close()
            await writer.wait_closed()

    assert asyncio.run(talk()) == [b"+PONG", b"+OK", b"hello"]

    async def unknown() -> None:
        await pico.sdk.connect("nobody", url=f"http://{ip}:8000")

    with pytest.raises(pico.sdk.UnknownEndpoint, match="502 no available upstreams"):
        asyncio.run(unknown())


@needs_redis
def test_the_examples_run_as_their_docstrings_say(
    procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    ip = "127.0.0.66"
    start_node(procs, ip)
    monkeypatch.setenv("PICO_URL", f"http://{ip}:8001")
    monkeypatch.setenv("PICO_PROXY_URL", f"http://{ip}:8000")
    starlette = procs.start("starlette-example", [sys.executable, "examples/starlette_app.py"])
    flask = procs.start("flask-example", [sys.executable, "examples/flask_app.py"])
    wait_until(lambda: endpoint_listed(ip, "my-app"), what="my-app registered")
    wait_until(lambda: endpoint_listed(ip, "legacy"), what="legacy registered")
    status, body = http_get(f"http://{ip}:8000/", {"x-pico-endpoint": "my-app"})
    assert (status, json.loads(body)["hello"]) == (200, "world")
    status, body = http_get(f"http://{ip}:8000/", {"x-pico-endpoint": "legacy"})
    assert (status, json.loads(body)["hello"]) == (200, "flask")
    redis_behind_an_agent(procs, ip, 6466)
    redis = procs.start("redis-example", [sys.executable, "examples/connect_redis.py"])
    assert redis.wait(timeout=30) == 0, redis.output()
    assert redis.output().splitlines() == [
        "PING -> PONG",
        "SET  -> OK",
        "GET  -> hello from pico",
    ]
    for example in (starlette, flask):
        example.signal(signal.SIGINT)  # Ctrl-C
        assert example.wait(timeout=30) == 0, example.output()
    assert "shutdown: runs after the drain" in starlette.output()
