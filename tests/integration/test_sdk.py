"""`pico.sdk` against in-process nodes: a Starlette app through `serve_asgi`, Flask through
`serve_wsgi`, raw streams through `listen` and `connect`, and what `close()` leaves (nothing).

The end-to-end suite (tests/e2e/test_sdk_e2e.py) runs the same apps as processes behind real
`pico server` processes; here the node is in the test's loop, so its registry, the SDK's tasks
and file descriptors can be looked at directly.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psutil
import pytest
import websockets

import pico.sdk
from pico.server.node import Node
from tests.integration.test_auth import SECRET, permits
from tests.support.cluster import Harness, proxy_url, wait_for
from tests.support.sdk_apps import Record, flask_app, starlette_app


def upstream_url(node: Node) -> str:
    assert node.addrs is not None
    host, port = node.addrs.upstream
    return f"http://{host}:{port}"


def registered(node: Node, endpoint: str) -> int:
    return node.registry.counts().get(endpoint, 0)


def client(node: Node, endpoint: str = "app", **options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=proxy_url(node), headers={"x-pico-endpoint": endpoint}, timeout=30, **options
    )


def streams_opened(served: pico.sdk.Served) -> float:
    """The agent's own count of streams the node opened to the app."""
    value = served.metrics.registry.get_sample_value(
        "pico_agent_streams_total", {"endpoint": served.endpoint}
    )
    return float(value or 0)


async def test_json_request_reaches_the_app_with_the_client_address_from_the_node(
    h: Harness,
) -> None:
    node = await h.node()
    record = Record()
    async with pico.sdk.serve_asgi(starlette_app(record), "app", url=upstream_url(node)):
        assert registered(node, "app") == 1
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.62")
        async with client(node, transport=transport) as http:
            # A client's own X-Forwarded-For is kept but not believed: the node appends
            # the address it saw, and only the node is trusted.
            resp = await http.get("/?n=1", headers={"x-forwarded-for": "6.6.6.6"})
    assert resp.status_code == 200
    assert resp.json() == {"hello": "world", "client": "127.0.0.62", "scheme": "http", "n": "1"}


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_a_hundred_keep_alive_requests_share_one_stream(h: Harness, http: str) -> None:
    node = await h.node()
    app = starlette_app(Record())
    async with pico.sdk.serve_asgi(app, "app", url=upstream_url(node), http=http) as s:
        async with client(node) as c:
            for n in range(100):
                resp = await c.get(f"/?n={n}")
                assert resp.json()["n"] == str(n)
        assert streams_opened(s) == 1  # one client connection, one stream, one uvicorn conn


async def test_lifespan_starts_before_the_endpoint_registers_and_ends_after_the_drain(
    h: Harness,
) -> None:
    node = await h.node()
    record = Record()
    seen_at_startup: list[int] = []
    app = starlette_app(record, on_startup=lambda: seen_at_startup.append(registered(node, "app")))
    served = pico.sdk.serve_asgi(app, "app", url=upstream_url(node), grace=10)
    async with served, client(node) as http:
        assert seen_at_startup == [0]
        request = asyncio.ensure_future(http.get("/held"))
        await wait_for(lambda: "held" in record.events, what="request in the app")
        closing = asyncio.ensure_future(served.close())
        await wait_for(lambda: registered(node, "app") == 0, what="GoAway: endpoint gone")
        assert not closing.done() and "shutdown" not in record.events
        record.released.set()  # the in-flight request finishes within the grace period
        resp = await request
        await closing
    assert (resp.status_code, resp.text) == (200, "released")
    assert record.events == ["startup", "held", "shutdown"]


async def test_a_failed_lifespan_startup_raises_and_never_registers(h: Harness) -> None:
    node = await h.node()

    def fail() -> None:
        raise RuntimeError("no database")

    app = starlette_app(Record(), on_startup=fail)
    with pytest.raises(pico.sdk.StartupFailed, match="lifespan startup failed"):
        async with pico.sdk.serve_asgi(app, "app", url=upstream_url(node)):
            raise AssertionError("never served")
    assert registered(node, "app") == 0


async def test_close_leaves_no_task_no_descriptor_no_thread_and_no_tunnel(h: Harness) -> None:
    node = await h.node()
    me = psutil.Process()
    tasks_before = asyncio.all_tasks()
    fds_before = me.num_fds()
    threads_before = threading.active_count()
    record = Record()
    async with pico.sdk.serve_asgi(starlette_app(record), "app", url=upstream_url(node)) as s:
        async with client(node) as http:
            assert (await http.get("/")).status_code == 200
            # A request still in the app when the grace period ends is cancelled.
            held = asyncio.ensure_future(http.get("/held"))
            await wait_for(lambda: "held" in record.events, what="request in the app")
            await s.close(grace=0.2)
            resp = await held
    assert resp.status_code == 502
    async with pico.sdk.serve_wsgi(flask_app(), "legacy", url=upstream_url(node)):
        async with client(node, "legacy") as http:
            assert (await http.get("/")).status_code == 200
    await wait_for(lambda: not node.registry.counts(), what="no tunnel on the node")
    await wait_for(lambda: asyncio.all_tasks() == tasks_before, what="no task left")
    await wait_for(lambda: me.num_fds() == fds_before, what="no descriptor left")
    await wait_for(lambda: threading.active_count() == threads_before, what="no thread left")


async def test_sse_events_arrive_as_the_app_sends_them(h: Harness) -> None:
    node = await h.node()
    async with pico.sdk.serve_asgi(starlette_app(Record()), "app", url=upstream_url(node)):
        async with client(node) as http, client(node) as other:
            async with http.stream("GET", "/sse") as resp:
                lines = resp.aiter_lines()
                for i in range(3):
                    # Event i is here while the app waits to be asked for the next one.
                    assert await anext(lines) == f"data: event {i}"
                    assert await anext(lines) == ""
                    if i < 2:
                        await other.get("/sse/next")


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_websocket_echo_through_the_node(h: Harness, http: str) -> None:
    node = await h.node()
    app = starlette_app(Record())
    async with pico.sdk.serve_asgi(app, "app", url=upstream_url(node), http=http):
        uri = proxy_url(node).replace("http", "ws") + "/ws"
        async with websockets.connect(uri, additional_headers={"x-pico-endpoint": "app"}) as ws:
            for message in ("hello", b"\x00\x01binary", "x" * 200_000):
                await ws.send(message)
                assert await ws.recv() == message


async def test_client_that_aborts_brings_http_disconnect_to_the_app(h: Harness) -> None:
    node = await h.node()
    record = Record()
    async with pico.sdk.serve_asgi(starlette_app(record), "app", url=upstream_url(node)):
        assert node.addrs is not None
        _, writer = await asyncio.open_connection(*node.addrs.proxy)
        writer.write(b"GET /disconnect HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: app\r\n\r\n")
        await wait_for(lambda: "waiting" in record.events, what="request in the app")
        # An abort (RST), not a half-close: a client that only half-closes still gets its
        # response, so the node keeps waiting for it.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        await wait_for(lambda: "http.disconnect" in record.events, what="http.disconnect")


async def test_slow_client_pauses_the_apps_send(h: Harness) -> None:
    node = await h.node()
    record = Record()
    async with pico.sdk.serve_asgi(starlette_app(record), "app", url=upstream_url(node)):
        assert node.addrs is not None
        reader, writer = await asyncio.open_connection(*node.addrs.proxy, limit=1 << 16)
        writer.write(b"GET /infinite HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: app\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        # The client reads no more: the app's send() stops returning once the socket, the
        # node and the stream's window are full.
        await wait_for(lambda: record.sent > 0, what="app sending")
        await _wait_stable(lambda: record.sent)
        assert record.sent < 64 * 1024 * 1024
        stalled = record.sent
        got = 0
        while got < 4 * stalled + (1 << 20):  # reading again lets it go on
            got += len(await reader.read(1 << 20))
        assert record.sent > stalled
        writer.close()


async def test_slow_app_pauses_the_clients_upload(h: Harness) -> None:
    node = await h.node()
    record = Record()
    produced = [0]
    total = 256 * 1024 * 1024

    async def body() -> AsyncIterator[bytes]:
        chunk = b"u" * (1 << 20)
        while produced[0] < total:
            produced[0] += len(chunk)
            yield chunk

    async with pico.sdk.serve_asgi(starlette_app(record), "app", url=upstream_url(node)):
        async with client(node) as http:
            upload = asyncio.ensure_future(http.post("/slow-upload", content=body()))
            await wait_for(lambda: produced[0] > 0, what="upload started")
            await _wait_stable(lambda: produced[0])
            assert produced[0] < 96 * 1024 * 1024  # the app takes nothing: the client stalls
            record.released.set()
            resp = await upload
    assert resp.json() == {"received": total}


async def _wait_stable(value: Any, *, settle: float = 0.5, timeout: float = 20.0) -> None:
    """Wait until `value()` has not changed for `settle` seconds (a stalled transfer)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, since = value(), loop.time()
    while loop.time() - since < settle:
        assert loop.time() < deadline, "the transfer never stalled"
        await asyncio.sleep(0.05)
        now = value()
        if now != last:
            last, since = now, loop.time()


async def test_flask_app_through_serve_wsgi(h: Harness) -> None:
    node = await h.node()
    async with pico.sdk.serve_wsgi(flask_app(), "legacy", url=upstream_url(node)):
        async with client(node, "legacy") as http:
            hello = await http.get("/")
            echo = await http.post("/echo", content=b"x" * 3_000_000)
            stream = await http.get("/stream")
    assert hello.json() == {"hello": "flask", "client": "127.0.0.1"}
    assert echo.content == b"x" * 3_000_000
    assert stream.text == "".join(f"line {i}\n" for i in range(5))


async def test_requests_waiting_for_a_hung_wsgi_app_are_bounded_and_the_rest_get_503(
    h: Harness,
) -> None:
    node = await h.node()
    entered = threading.Event()
    release = threading.Event()

    def hung_app(environ: Any, start_response: Any) -> list[bytes]:
        entered.set()
        release.wait(60)  # every thread hangs (a deadlock, a dead database) until released
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"done"]

    try:
        async with pico.sdk.serve_wsgi(hung_app, "legacy", url=upstream_url(node), threads=1) as s:
            many = httpx.Limits(max_connections=None)
            async with client(node, "legacy", limits=many) as http:
                first = asyncio.ensure_future(http.get("/"))
                await wait_for(entered.is_set, what="the only thread taken")
                # Without a bound each would wait for the thread, and hold what it holds,
                # for as long as the app hangs (a client that gives up leaves it waiting).
                more = [asyncio.ensure_future(http.get("/")) for _ in range(150)]
                await wait_for(lambda: any(r.done() for r in more), what="an answer at once")
                release.set()
                answers = await asyncio.gather(*more)
                assert (await first).text == "done"
            refused = [r for r in answers if r.status_code == 503]
            assert refused and {r.status_code for r in answers} == {200, 503}
            assert refused[0].json() == {
                "error": "wsgi app busy: too many requests waiting for a thread"
            }
            labels = {"endpoint": "legacy", "limit": "wsgi_waiting"}
            counted = s.metrics.registry.get_sample_value(
                "pico_agent_limit_rejections_total", labels
            )
            assert counted == len(refused)
    finally:
        release.set()


class EndlessWsgiApp:
    """A WSGI app whose /endless response never ends (a stream of ticks, as server-sent
    events are), and whose / says "free"; `closed` is set once the endless iterable is
    closed, `stop` ends it from the test."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.stop = threading.Event()

    def __call__(self, environ: Any, start_response: Any) -> Any:
        start_response("200 OK", [("content-type", "text/plain")])
        if environ["PATH_INFO"] != "/endless":
            return [b"free"]
        return self.ticks()

    def ticks(self) -> Any:
        try:
            while not self.stop.is_set():
                yield b"tick\n"
        finally:
            self.closed.set()


async def open_endless(node: Node) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection reading the first line of /endless (then it reads no more)."""
    assert node.addrs is not None
    reader, writer = await asyncio.open_connection(*node.addrs.proxy)
    writer.write(b"GET /endless HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: legacy\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    return reader, writer


async def test_an_endless_wsgi_response_frees_its_thread_when_the_client_leaves(
    h: Harness,
) -> None:
    node = await h.node()
    app = EndlessWsgiApp()
    async with pico.sdk.serve_wsgi(app, "legacy", url=upstream_url(node), threads=1):
        try:
            _, writer = await open_endless(node)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # the client leaves (RST)
            await wait_for(app.closed.is_set, what="the endless iterable closed")
            async with client(node, "legacy") as http:  # the only thread is free again
                assert (await http.get("/")).text == "free"
        finally:
            app.stop.set()


async def test_close_frees_the_thread_of_an_endless_wsgi_response(h: Harness) -> None:
    node = await h.node()
    app = EndlessWsgiApp()
    threads_before = threading.active_count()
    served = pico.sdk.serve_wsgi(app, "legacy", url=upstream_url(node), threads=1)
    async with served:
        _, writer = await open_endless(node)  # its thread waits: the client does not read
        await served.close(grace=0.2)
    await wait_for(app.closed.is_set, what="the endless iterable closed")
    await wait_for(lambda: threading.active_count() == threads_before, what="no thread left")
    writer.close()


async def test_close_ends_the_body_read_of_a_wsgi_request_whose_upload_stalled(
    h: Harness,
) -> None:
    node = await h.node()
    read: list[bytes] = []

    def reader_app(environ: Any, start_response: Any) -> list[bytes]:
        read.append(environ["wsgi.input"].read())  # the client sends 5 bytes of 1 MB
        start_response("200 OK", [])
        return [b""]

    threads_before = threading.active_count()
    served = pico.sdk.serve_wsgi(reader_app, "legacy", url=upstream_url(node), threads=1)
    async with served:
        assert node.addrs is not None
        _, writer = await asyncio.open_connection(*node.addrs.proxy)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: legacy\r\n"
            b"Content-Length: 1000000\r\n\r\nhello"
        )
        await wait_for(lambda: streams_opened(served) == 1, what="the request at the app")
        await served.close(grace=0.2)
    await wait_for(lambda: read == [b"hello"], what="the read ended with what came")
    await wait_for(lambda: threading.active_count() == threads_before, what="no thread left")
    writer.close()


async def test_listen_and_connect_carry_raw_streams_both_ways(h: Harness) -> None:
    node = await h.node()
    async with pico.sdk.listen("raw", url=upstream_url(node)) as listener:

        async def serve() -> None:
            async for reader, writer in listener:
                data = await reader.read()  # until the client half-closes
                writer.write(data.upper())
                writer.close()
                await writer.wait_closed()
                return

        server = asyncio.ensure_future(serve())
        reader, writer = await pico.sdk.connect("raw", url=proxy_url(node))
        writer.write(b"hello through pico")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"HELLO THROUGH PICO"
        writer.close()
        await server


async def test_listener_refuses_past_its_backlog_and_its_close_leaves_nothing(
    h: Harness,
) -> None:
    node = await h.node()
    tasks_before = asyncio.all_tasks()
    me = psutil.Process()
    fds_before = me.num_fds()
    async with pico.sdk.listen("raw", url=upstream_url(node), backlog=1) as listener:
        waiting = await pico.sdk.connect("raw", url=proxy_url(node))  # fills the backlog
        # Not taken by the application, so the next one is refused: the node says 502.
        with pytest.raises(pico.sdk.Unreachable, match="502"):
            await pico.sdk.connect("raw", url=proxy_url(node))
        reader, writer = await listener.accept()
        writer.write(b"taken")
        assert await waiting[0].readexactly(5) == b"taken"
        taken = (reader, writer)
        await listener.close(grace=0.5)  # the open one is cut after it
        assert await waiting[0].read() == b""  # the tunnel closed under the open one
        with pytest.raises(ConnectionAbortedError):
            await listener.accept()
        assert [pair async for pair in listener] == []
    taken[1].close()
    waiting[1].close()
    await waiting[1].wait_closed()
    await wait_for(lambda: not node.registry.counts(), what="no tunnel on the node")
    await wait_for(lambda: asyncio.all_tasks() == tasks_before, what="no task left")
    await wait_for(lambda: me.num_fds() == fds_before, what="no descriptor left")


async def test_entering_while_no_node_answers_is_safe_to_cancel() -> None:
    tasks_before = asyncio.all_tasks()
    served = pico.sdk.serve_asgi(starlette_app(Record()), "app", url="http://127.0.0.1:9")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await served.__aenter__()  # retries with backoff: nobody listens on port 9
    assert not served.connected
    await wait_for(lambda: asyncio.all_tasks() == tasks_before, what="no task left")


async def test_connect_errors_say_what_the_node_said(h: Harness) -> None:
    node = await h.node(proxy={"auth": {"hmac_secret_key": SECRET}})
    async with pico.sdk.serve_asgi(starlette_app(Record()), "web", url=upstream_url(node)):
        url = proxy_url(node)
        with pytest.raises(pico.sdk.UnknownEndpoint, match="502 no available upstreams"):
            await pico.sdk.connect("nobody", url=url, api_key=permits("nobody"))
        with pytest.raises(pico.sdk.NotPermitted, match="401 missing token"):
            await pico.sdk.connect("web", url=url)
        with pytest.raises(pico.sdk.NotPermitted, match="403"):
            await pico.sdk.connect("web", url=url, api_key=permits("other"))
        with pytest.raises(pico.sdk.WrongProtocol, match="400 endpoint is http"):
            await pico.sdk.connect("web", url=url, api_key=permits("web"))
    with pytest.raises(pico.sdk.Unreachable, match=r"cannot reach http://127\.0\.0\.1:9"):
        await pico.sdk.connect("web", url="http://127.0.0.1:9")


async def test_connect_to_a_tcp_endpoint_whose_service_refuses_is_unreachable(
    h: Harness,
) -> None:
    node = await h.node()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nobody listens there
    await h.tcp_agent(node, "gone", port)
    await h.tunnel_up(node, "gone")
    with pytest.raises(pico.sdk.Unreachable, match="'gone': 502 upstream unreachable"):
        await pico.sdk.connect("gone", url=proxy_url(node))


async def test_rejected_endpoint_raises_with_the_nodes_reason(h: Harness) -> None:
    node = await h.node(upstream={"auth": {"hmac_secret_key": SECRET}})
    with pytest.raises(pico.sdk.EndpointRejected, match="403 endpoint not permitted"):
        async with pico.sdk.serve_asgi(
            starlette_app(Record()), "app", url=upstream_url(node), api_key=permits("other")
        ):
            raise AssertionError("never registered")
    async with pico.sdk.serve_asgi(
        starlette_app(Record()), "app", url=upstream_url(node), api_key=permits("app")
    ):
        assert registered(node, "app") == 1


async def test_run_inside_a_running_loop_raises_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="cannot be called inside a running event loop"):
        pico.sdk.run(starlette_app(Record()), "app", url="http://127.0.0.1:9")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"endpoint": "bad id"}, "invalid endpoint id 'bad id'"),
        ({"url": "ftp://x"}, "invalid argument: server.url: invalid URL 'ftp://x'"),
        ({"grace": -1}, "grace=-1: must be >= 0 seconds"),
        ({"http": "twisted"}, "http='twisted': use one of httptools, h11"),
    ],
)
def test_bad_arguments_are_value_errors_that_say_which(kwargs: dict[str, Any], error: str) -> None:
    options: dict[str, Any] = {"endpoint": "app", "url": "http://127.0.0.1:9", **kwargs}
    with pytest.raises(ValueError) as caught:
        pico.sdk.serve_asgi(starlette_app(Record()), options.pop("endpoint"), **options)
    assert error in str(caught.value)


def test_a_serve_call_that_is_never_entered_warns_that_nothing_is_served() -> None:
    # `pico.sdk.serve_wsgi(app, ...)` alone on a line serves nothing (it is an async context
    # manager): the user is told, as for a coroutine never awaited.
    def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"never"]

    served = pico.sdk.serve_wsgi(wsgi_app, "legacy", url="http://127.0.0.1:9")
    with pytest.warns(RuntimeWarning, match="endpoint 'legacy' was never served: use `async with"):
        del served
        gc.collect()
