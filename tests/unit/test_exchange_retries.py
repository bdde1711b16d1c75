"""The proxy engine against fake upstreams: which failures are retried elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import cast

from pico.http.channel import Cancellable, Channel, ChannelReceiver, ResetReason, Upstream
from pico.http.proxy import ProxyConnection
from pico.http.settings import ProxyLimits

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UNDELIVERED_GARBAGE = (
    b"HTTP/1.1 502 Bad Gateway\r\nx-pico-undelivered: true\r\nContent-Length: 3\r\n\r\nabczz"
)
# A 600 KB response head (the limit is 256 KiB), delivered in one piece.
BIG_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-Big-%d: %s\r\n" % (i, b"v" * 1000) for i in range(600))
    + b"Content-Length: 2\r\n\r\nok"
)


class FakeChannel:
    """A channel whose peer answers the first write with `behaviour`."""

    def __init__(self, behaviour: str, log: list[str]) -> None:
        self.behaviour = behaviour
        self.log = log
        self.receiver: ChannelReceiver | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def set_receiver(self, receiver: ChannelReceiver) -> None:
        self.receiver = receiver

    def write(self, data: bytes | memoryview) -> None:
        if self.behaviour == "silent":  # the peer answers the first write only
            return
        self.log.append(self.behaviour)
        loop = asyncio.get_running_loop()
        if self.behaviour == "ok":
            loop.call_soon(self._deliver, RESPONSE)
        elif self.behaviour == "undelivered_garbage":
            # Another node's "not delivered", then bytes that break the parser, in one read.
            loop.call_soon(self._deliver, UNDELIVERED_GARBAGE)
        elif self.behaviour == "big_head":
            loop.call_soon(self._deliver, BIG_HEAD)
        else:
            loop.call_soon(self._lose, ResetReason[self.behaviour])
        self.behaviour = "silent"

    def _deliver(self, data: bytes) -> None:
        if self.receiver is not None:
            self.receiver.data_received(data)

    def _lose(self, reason: ResetReason) -> None:
        self._closed = True
        receiver, self.receiver = self.receiver, None
        if receiver is not None:
            receiver.connection_lost(reason)

    def write_eof(self) -> None:
        pass

    def reset(self, reason: ResetReason = ResetReason.CANCELLED) -> None:
        self._closed = True
        self.receiver = None

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class FakeUpstream:
    def __init__(self, name: str, behaviour: str, log: list[str], *, remote: bool = False) -> None:
        self.name = name
        self.behaviour = behaviour
        self.log = log
        self._remote = remote

    @property
    def label(self) -> str:
        return self.name

    @property
    def remote(self) -> bool:
        return self._remote

    def open_channel(self, fresh: bool = False) -> tuple[Channel, bool]:
        return FakeChannel(self.behaviour, self.log), False

    def release_channel(self, channel: Channel) -> None:
        channel.reset(ResetReason.NORMAL)


class FakeRouter:
    def __init__(self, upstreams: Sequence[Upstream]) -> None:
        self.upstreams = upstreams

    def candidates(self, endpoint_id: str, forwarded: bool) -> Sequence[Upstream]:
        return list(self.upstreams)

    def wait_for_upstream(
        self, endpoint_id: str, callback: Callable[[], None], *, known: bool = False
    ) -> Cancellable | None:
        return None


async def request_through(upstreams: Sequence[Upstream]) -> bytes:
    loop = asyncio.get_running_loop()
    router = FakeRouter(upstreams)
    server = await loop.create_server(
        lambda: ProxyConnection(router, ProxyLimits()), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: ep\r\nContent-Length: 1\r\n\r\nz")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    server.close()
    return head.split(b"\r\n", 1)[0]


async def test_stream_rejected_by_a_leaving_agent_is_retried_on_the_next_upstream() -> None:
    log: list[str] = []
    status = await request_through(
        [FakeUpstream("leaving", "REJECTED", log), FakeUpstream("healthy", "ok", log)]
    )
    assert status == b"HTTP/1.1 200 OK"
    assert log == ["REJECTED", "ok"]


async def test_service_that_refused_the_connection_is_retried_on_the_next_upstream() -> None:
    log: list[str] = []
    status = await request_through(
        [FakeUpstream("down", "REFUSED", log), FakeUpstream("healthy", "ok", log)]
    )
    assert status == b"HTTP/1.1 200 OK"


async def test_stream_lost_after_reaching_a_service_is_not_retried() -> None:
    log: list[str] = []
    status = await request_through(
        [FakeUpstream("crashed", "CANCELLED", log), FakeUpstream("healthy", "ok", log)]
    )
    assert status == b"HTTP/1.1 502 Bad Gateway"
    assert log == ["CANCELLED"]


async def test_request_another_node_could_not_deliver_is_sent_to_the_next_candidate() -> None:
    from pico.server.forward import NodeUpstream

    loop = asyncio.get_running_loop()
    log: list[str] = []
    # Node B: its only upstream is an agent that is leaving.
    node_b = await loop.create_server(
        lambda: ProxyConnection(
            FakeRouter([FakeUpstream("leaving", "REJECTED", log)]),
            ProxyLimits(),
            trusted_forwarder=lambda ip: True,
        ),
        "127.0.0.1",
        0,
    )
    b_port = node_b.sockets[0].getsockname()[1]
    # Node A: gossip says B has the endpoint; another upstream has it too.
    status = await request_through(
        [NodeUpstream("node-b", f"127.0.0.1:{b_port}"), FakeUpstream("healthy", "ok", log)]
    )
    node_b.close()
    assert status == b"HTTP/1.1 200 OK"
    assert log == ["REJECTED", "ok"]


class HoldingRouter(FakeRouter):
    """Knows the endpoint but never sees it come back: every hold runs out."""

    def __init__(self, upstreams: Sequence[Upstream]) -> None:
        super().__init__(upstreams)
        self.held = asyncio.Event()

    def wait_for_upstream(
        self, endpoint_id: str, callback: Callable[[], None], *, known: bool = False
    ) -> Cancellable | None:
        self.held.set()

        class Handle:
            def cancel(self) -> None:
                pass

        return Handle()


async def test_body_bytes_of_held_requests_do_not_stall_the_connection() -> None:
    loop = asyncio.get_running_loop()
    log: list[str] = []
    router = HoldingRouter([FakeUpstream("leaving", "REJECTED", log)])
    limits = ProxyLimits(upstream_wait=0.2, pipeline_limit=100)
    server = await loop.create_server(lambda: ProxyConnection(router, limits), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    head = b"POST / HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: ep\r\nContent-Length: 60\r\n\r\n"
    for _ in range(3):  # 3 x 60 body bytes arrive while the request is held
        router.upstreams = [FakeUpstream("leaving", "REJECTED", log)]
        router.held.clear()
        writer.write(head + b"a")
        await asyncio.wait_for(router.held.wait(), 5)
        writer.write(b"b" * 59)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert answer.startswith(b"HTTP/1.1 502 ")
        await reader.readuntil(b"\n")  # the JSON body
    # The connection still reads: a next request is answered (here: another 502).
    router.upstreams = []
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: ep\r\n\r\n")
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert answer.startswith(b"HTTP/1.1 ")
    writer.close()
    server.close()


class RollingRouter(FakeRouter):
    """An agent is being replaced: the new one registers just after the request started."""

    def __init__(self, old: Upstream, new: Upstream) -> None:
        super().__init__([old])
        self.new = new

    def candidates(self, endpoint_id: str, forwarded: bool) -> Sequence[Upstream]:
        current = list(self.upstreams)
        self.upstreams = [*self.upstreams, self.new]  # registered meanwhile
        return current


async def test_upstream_registered_while_the_request_was_tried_elsewhere_is_used_at_once() -> None:
    log: list[str] = []
    old, new = FakeUpstream("old", "REJECTED", log), FakeUpstream("new", "ok", log)
    loop = asyncio.get_running_loop()
    router = RollingRouter(old, new)
    server = await loop.create_server(
        lambda: ProxyConnection(router, ProxyLimits(upstream_wait=30)), "127.0.0.1", 0
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: ep\r\n\r\n")
    # Well before the 30 s hold would end: the new upstream is tried straight away.
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert log == ["REJECTED", "ok"]
    writer.close()
    server.close()


async def test_a_huge_response_head_in_one_piece_gets_502() -> None:
    # The head limit holds whether the head arrives cut (raw bytes counted) or whole.
    log: list[str] = []
    status = await request_through([FakeUpstream("odd", "big_head", log)])
    assert status == b"HTTP/1.1 502 Bad Gateway"


async def test_a_broken_not_delivered_answer_is_answered_once_and_never_crashes() -> None:
    """The reroute of a "not delivered" ran after the parser error had ended the exchange:
    a TransitionError in the loop, and the 502 already written was never sent."""
    log: list[str] = []
    status = await request_through(
        [
            FakeUpstream("node-b", "undelivered_garbage", log, remote=True),
            FakeUpstream("healthy", "ok", log),
        ]
    )
    assert status == b"HTTP/1.1 502 Bad Gateway"
    assert log == ["undelivered_garbage"]


class DyingNode(asyncio.Protocol):
    """A node killed while our request reaches it: the connection is accepted, then reset."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        cast(asyncio.Transport, self.transport).abort()  # RST: the process is gone


async def request_with(method: bytes, upstreams: Sequence[Upstream]) -> bytes:
    loop = asyncio.get_running_loop()
    router = FakeRouter(upstreams)
    server = await loop.create_server(
        lambda: ProxyConnection(router, ProxyLimits()), "127.0.0.1", 0
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    writer.write(
        method + b" / HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: ep\r\nContent-Length: 0\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    server.close()
    return head.split(b"\r\n", 1)[0]


async def test_a_get_whose_new_connection_to_a_dying_node_is_reset_goes_to_the_next() -> None:
    """Issue 10, item 9: the connect succeeded, the node died before answering; a GET is
    sent to the next candidate instead of getting 502."""
    from pico.server.forward import NodeUpstream

    loop = asyncio.get_running_loop()
    dying = await loop.create_server(DyingNode, "127.0.0.1", 0)
    log: list[str] = []
    try:
        for method, expected in (
            (b"GET", b"HTTP/1.1 200 OK"),
            (b"POST", b"HTTP/1.1 502 Bad Gateway"),
        ):
            node = NodeUpstream("dying", f"127.0.0.1:{dying.sockets[0].getsockname()[1]}")
            status = await request_with(method, [node, FakeUpstream("healthy", "ok", log)])
            # A POST may have been executed by the node's service: it is not sent twice.
            assert status == expected, method
    finally:
        dying.close()


class ComingBackRouter(FakeRouter):
    """The only node with the endpoint dies; its agent reconnects to another one meanwhile."""

    def __init__(self, dead: Upstream, back: Upstream) -> None:
        super().__init__([dead])
        self.back = back

    def wait_for_upstream(
        self, endpoint_id: str, callback: Callable[[], None], *, known: bool = False
    ) -> Cancellable | None:
        self.upstreams = [self.back]
        handle = asyncio.get_running_loop().call_later(0.05, callback)
        return handle


async def test_a_get_lost_with_the_only_node_of_its_endpoint_waits_for_it_to_come_back() -> None:
    from pico.server.forward import NodeUpstream

    loop = asyncio.get_running_loop()
    dying = await loop.create_server(DyingNode, "127.0.0.1", 0)
    log: list[str] = []
    node = NodeUpstream("dying", f"127.0.0.1:{dying.sockets[0].getsockname()[1]}")
    router = ComingBackRouter(node, FakeUpstream("moved", "ok", log))
    server = await loop.create_server(
        lambda: ProxyConnection(router, ProxyLimits()), "127.0.0.1", 0
    )
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1]
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nx-pico-endpoint: ep\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert log == ["ok"]
        writer.close()
    finally:
        server.close()
        dying.close()
