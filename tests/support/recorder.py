"""A recording HTTP/1.1 service for tests where what reaches the service is the verdict.

It parses with h11, on purpose a different parser from the proxy's own, and records every
request (its connection, method, target, headers, body and trailers) and every raw byte received
per connection. Each request is answered `200` with `ok <n>`, n counting requests across
connections; keep-alive and pipelining work as h11 does them. A target starting with
`/early-401` is answered `401` right after its head, before its body is read, and the body is
then still read as the rest of that request (as Node.js does): the "service answers early" case.

`serve_through_pico()` puts a recorder behind one node or two (forwarded), and
`assert_victim_intact()` is the probe every smuggling test ends with.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import h11

from pico.server.node import Node
from tests.support.cluster import Harness, connect, wait_for

EARLY_401 = b"/early-401"

Headers = list[tuple[bytes, bytes]]


@dataclass
class RecordedRequest:
    """One request as the service parsed it (header names lowercased by h11)."""

    number: int  # the n of the `ok <n>` it was answered with
    connection: int
    method: bytes
    target: bytes
    http_version: bytes
    headers: Headers
    body: bytearray = field(default_factory=bytearray)
    trailers: Headers = field(default_factory=list)
    complete: bool = False  # the end of its body arrived

    def values(self, name: bytes) -> list[bytes]:
        """Every value of header `name` (lowercase), in order."""
        return [v for n, v in self.headers if n == name]

    def trailer_values(self, name: bytes) -> list[bytes]:
        """Every value of trailer field `name` (lowercase), in order."""
        return [v for n, v in self.trailers if n == name]


@dataclass(frozen=True)
class RecorderError:
    """The service's parser refused what arrived on `connection` (it was then closed)."""

    connection: int
    message: str


@dataclass
class _Connection:
    number: int
    parser: h11.Connection
    writer: asyncio.StreamWriter
    open: bool = True

    @property
    def settled(self) -> bool:
        """Closed, or between requests with nothing half-received."""
        if not self.open:
            return True
        idle = self.parser.their_state is h11.IDLE and self.parser.our_state is h11.IDLE
        return idle and not self.parser.trailing_data[0]


class Recorder:
    """The running service; build it with `start_recorder()`, stop it with `close()`."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.errors: list[RecorderError] = []
        self._raw: dict[int, bytearray] = {}
        self._connections: dict[int, _Connection] = {}
        self._connection_ids = itertools.count(1)
        self._request_numbers = itertools.count(1)
        self._handlers: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    @classmethod
    async def start(cls) -> Recorder:
        """Listen on 127.0.0.1, a free port (`.port`)."""
        recorder = cls()
        recorder._server = await asyncio.start_server(recorder._serve, "127.0.0.1", 0)
        recorder.port = int(recorder._server.sockets[0].getsockname()[1])
        return recorder

    # -- what the tests read -------------------------------------------------------------------

    @property
    def raw(self) -> dict[int, bytes]:
        """The bytes received on each connection, by connection number."""
        return {number: bytes(data) for number, data in self._raw.items()}

    def errors_on(self, connection: int) -> list[RecorderError]:
        """The parse errors recorded for one connection."""
        return [e for e in self.errors if e.connection == connection]

    async def wait_requests(self, n: int, timeout: float = 10.0) -> None:
        """Wait until `n` requests were recorded and each is complete or its connection ended.

        Raises AssertionError after `timeout` seconds."""

        def done() -> bool:
            return len(self.requests) >= n and all(
                r.complete or not self._connections[r.connection].open for r in self.requests[:n]
            )

        await self._wait(done, timeout, f"{n} request(s) recorded")

    async def wait_settled(self, timeout: float = 10.0, *, connection: int | None = None) -> None:
        """Wait until every connection (or just `connection`) is closed or idle with no partial
        request buffered: nothing that arrived is still being parsed. Raises AssertionError
        on timeout."""

        def settled() -> bool:
            return all(
                c.settled
                for c in self._connections.values()
                if connection is None or c.number == connection
            )

        what = "every connection" if connection is None else f"connection {connection}"
        await self._wait(settled, timeout, f"{what} closed or idle")

    async def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            states = {
                c.number: (c.parser.their_state, c.parser.trailing_data[0][:200])
                for c in self._connections.values()
                if not c.settled
            }
            raise AssertionError(
                f"recorder: not {what} within {timeout}s; requests={len(self.requests)}, "
                f"unsettled connections={states}"
            ) from None

    def _notify(self) -> None:
        self._changed.set()

    # -- serving -------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        number = next(self._connection_ids)
        state = _Connection(number, h11.Connection(h11.SERVER), writer)
        self._connections[number] = state
        self._raw[number] = bytearray()
        try:
            await self._converse(state, reader, writer)
        except h11.RemoteProtocolError as exc:
            self.errors.append(RecorderError(number, str(exc)))
            with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
                writer.write(_error_response(state.parser))
        except h11.LocalProtocolError as exc:
            self.errors.append(RecorderError(number, f"recorder could not answer: {exc}"))
        except ConnectionError as exc:
            self.errors.append(RecorderError(number, f"connection error: {exc!r}"))
        finally:
            state.open = False
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self._handlers.discard(task)
            self._notify()

    async def _converse(
        self, state: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        parser = state.parser
        current: RecordedRequest | None = None
        answered = False
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                if parser.our_state is h11.MUST_CLOSE:
                    return  # Connection: close or HTTP/1.0: we close after the response
                self._notify()  # everything received so far is parsed: waiters may check
                data = await reader.read(65536)
                self._raw[state.number] += data
                parser.receive_data(data)  # b"" is the peer's EOF
                continue
            if event is h11.PAUSED:
                if parser.our_state is h11.DONE and parser.their_state is h11.DONE:
                    parser.start_next_cycle()  # pipelined: the next request is buffered
                    continue
                # A CONNECT we answered 200: the rest is a tunnel, recorded raw only.
                await self._read_raw(state, reader)
                return
            match event:
                case h11.Request():
                    current = RecordedRequest(
                        number=next(self._request_numbers),
                        connection=state.number,
                        method=bytes(event.method),
                        target=bytes(event.target),
                        http_version=bytes(event.http_version),
                        headers=[(bytes(n), bytes(v)) for n, v in event.headers],
                    )
                    self.requests.append(current)
                    answered = False
                    if current.target.startswith(EARLY_401):
                        # Answer before reading the body; h11 then goes on reading it as the
                        # rest of this request, and the next request after it.
                        writer.write(_response(parser, 401, current))
                        await writer.drain()
                        answered = True
                case h11.Data():
                    assert current is not None
                    current.body += event.data
                case h11.EndOfMessage():
                    assert current is not None
                    current.trailers = [(bytes(n), bytes(v)) for n, v in event.headers]
                    current.complete = True
                    if not answered:
                        writer.write(_response(parser, 200, current))
                        answered = True
                    await writer.drain()
                    if parser.our_state is h11.DONE and parser.their_state is h11.DONE:
                        parser.start_next_cycle()
                case h11.ConnectionClosed():
                    return
            self._notify()

    async def _read_raw(self, state: _Connection, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(65536):
            self._raw[state.number] += data
            self._notify()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        # Aborting the sockets ends each handler's read (cancelling the tasks instead would
        # make asyncio's stream callback re-raise the cancellation).
        for connection in self._connections.values():
            connection.writer.transport.abort()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Recorder:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _response(parser: h11.Connection, status: int, request: RecordedRequest) -> bytes:
    """A complete `ok <n>` response with Content-Length (the length only, after HEAD)."""
    body = b"ok %d" % request.number
    headers = [(b"Content-Length", b"%d" % len(body))]
    out = parser.send(h11.Response(status_code=status, headers=headers)) or b""
    if request.method != b"HEAD":  # h11 frames the answer to HEAD as an empty body
        out += parser.send(h11.Data(data=body)) or b""
    out += parser.send(h11.EndOfMessage()) or b""
    return out


def _error_response(parser: h11.Connection) -> bytes:
    """The 400 for input h11 refused (then the connection is closed)."""
    body = b"bad request\n"
    headers = [(b"Content-Length", b"%d" % len(body)), (b"Connection", b"close")]
    out = parser.send(h11.Response(status_code=400, headers=headers)) or b""
    out += parser.send(h11.Data(data=body)) or b""
    return out + (parser.send(h11.EndOfMessage()) or b"")


async def start_recorder() -> Recorder:
    """Start a recording service on 127.0.0.1 (a free port); `await close()` stops it."""
    return await Recorder.start()


# -- the recorder behind Pico ------------------------------------------------------------------


async def serve_through_pico(
    h: Harness, recorder: Recorder, *, forwarded: bool, **sections: Any
) -> Node:
    """Register `recorder` as endpoint `ep` through an agent on a node; returns the node that
    clients should connect to. With `forwarded`, that is a second node, joined to the first by
    gossip, that reaches `ep` only by forwarding. `sections` configure both nodes."""
    holder = await h.node(**sections)
    await h.agent(holder, [f"ep/127.0.0.1:{recorder.port}"])
    await h.tunnel_up(holder, "ep")
    if not forwarded:
        return holder
    assert holder.addrs is not None
    host, port = holder.addrs.gossip
    entry = await h.node(cluster={"join": [f"{host}:{port}"]}, **sections)

    def gossiped() -> bool:
        remote = entry.cluster.remotes.get(holder.node_id)
        return remote is not None and remote.endpoints.get("ep") == 1

    await wait_for(gossiped, what="the forwarding node sees endpoint ep")
    return entry


VICTIM = b"GET /victim HTTP/1.1\r\nHost: ep.example.com\r\nCookie: secret=1\r\n\r\n"


async def assert_victim_intact(entry: Node, recorder: Recorder) -> RecordedRequest:
    """Send an innocent request on a new connection; assert the service's next request is
    exactly it, alone and whole, and that its answer is the one the service gave it.

    A request smuggled earlier, or a half-used upstream stream put back in the pool, shows up
    here: as an extra request, as the victim's bytes swallowed into a body, or as the victim
    getting another request's answer."""
    before = len(recorder.requests)
    conn = await connect(entry)
    try:
        await conn.send(VICTIM)
        resp = await conn.read_response()
    except TimeoutError:
        raise AssertionError(
            "the victim got no answer: its bytes went into what the service still expected "
            f"of an earlier request? service connections: {recorder.raw}"
        ) from None
    finally:
        await conn.close()
    assert resp.status == 200, f"victim got {resp.status} {resp.body!r}"
    await recorder.wait_requests(before + 1)
    arrived = recorder.requests[before:]
    victim = arrived[-1]
    # Nothing may follow it on its connection (a prefix smuggled ahead of it would have).
    await recorder.wait_settled(connection=victim.connection)
    arrived = recorder.requests[before:]
    assert [(r.method, r.target) for r in arrived] == [(b"GET", b"/victim")], arrived
    assert victim.complete and victim.body == b"" and victim.trailers == []
    assert victim.values(b"host") == [b"ep.example.com"]
    assert victim.values(b"cookie") == [b"secret=1"]
    # No framing header: the victim has no body, and no header was added or lost on the way.
    names = {n for n, _ in victim.headers if not n.startswith(b"x-forwarded-")}
    assert names == {b"host", b"cookie"}, victim.headers
    assert recorder.errors_on(victim.connection) == []
    assert resp.body == b"ok %d" % victim.number, "the victim got another request's answer"
    return victim
