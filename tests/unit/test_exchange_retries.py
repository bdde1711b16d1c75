"""The proxy engine against fake upstreams: which failures are retried elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from pico.http.channel import Cancellable, Channel, ChannelReceiver, ResetReason, Upstream
from pico.http.proxy import ProxyConnection
from pico.http.settings import ProxyLimits

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


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
    def __init__(self, name: str, behaviour: str, log: list[str]) -> None:
        self.name = name
        self.behaviour = behaviour
        self.log = log

    @property
    def label(self) -> str:
        return self.name

    @property
    def remote(self) -> bool:
        return False

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
        self, endpoint_id: str, callback: Callable[[], None]
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
