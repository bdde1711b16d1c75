"""The response direction alone: bytes from a channel in, writes to the client and events out."""

from __future__ import annotations

from typing import Any

import pytest

from pico.http.framing import Body
from pico.http.request import Request
from pico.http.response import ResponseReader
from pico.http.states import Receive, TransitionError


class Timer:
    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1


class Client:
    """The writes a reader makes to its client."""

    def __init__(self) -> None:
        self.out = b""
        self.response_timer = Timer()

    def write(self, data: bytes | memoryview) -> None:
        self.out += bytes(data)

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        self.out += b"".join(parts)


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def completed(self, keep_alive: bool) -> None:
        self.seen.append(("completed", keep_alive))

    def broken(self, why: str) -> None:
        self.seen.append(("broken", why))

    def upgraded(self) -> None:
        self.seen.append(("upgraded", None))


def reader(method: bytes = b"GET", version: str = "1.1") -> tuple[ResponseReader, Client, Events]:
    req = Request(0.0)
    req.method, req.version = method, version
    client, events = Client(), Events()
    r = ResponseReader(client, req, events)  # type: ignore[arg-type]
    r.new_channel(remote=False)
    return r, client, events


def dechunk(body: bytes) -> tuple[bytes, bytes]:
    """The data of a chunked body (chunks as the node re-framed them) and its trailer section."""
    data = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return data, body
        data += body[:size]
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


def feed_split(r: ResponseReader, data: bytes, size: int) -> None:
    for i in range(0, len(data), size):
        r.feed(data[i : i + size])


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_a_chunked_response_with_trailers_is_relayed_chunked_in_any_split(size: int) -> None:
    r, client, events = reader()
    feed_split(
        r,
        b"HTTP/1.1 200 OK\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n0\r\nX-Sum: 1\r\nHost: evil\r\n\r\n",
        size,
    )
    head, _, body = client.out.partition(b"\r\n\r\n")
    assert head == b"HTTP/1.1 200 OK\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked"
    data, trailers = dechunk(body)
    assert (data, trailers) == (b"abc", b"X-Sum: 1\r\n\r\n")  # Host never passes
    assert events.seen == [("completed", True)]
    assert r.state is Receive.DONE
    assert client.response_timer.cancelled == 1  # the wait for the head ended with it


def test_content_length_is_stated_by_the_node_whatever_connection_names() -> None:
    r, client, events = reader()
    r.feed(b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\nhi")
    assert client.out == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    assert events.seen[-1] == ("completed", True)


def test_bytes_after_the_response_mark_the_channel_unusable() -> None:
    r, _, _ = reader()
    r.feed(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
    assert r.stray_bytes


def test_a_head_request_states_the_length_of_the_body_it_does_not_get() -> None:
    r, client, events = reader(method=b"HEAD")
    r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert client.out == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    assert r.framing.body is Body.NONE and events.seen[-1] == ("completed", True)


def test_an_unframed_response_ends_by_close_and_closes_the_client() -> None:
    r, client, _ = reader()
    r.feed(b"HTTP/1.1 200 OK\r\n\r\npartial")
    assert r.ends_by_close and r.close_client
    assert client.out.endswith(b"Connection: close\r\n\r\npartial")


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhi",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: " + b"v" * 300_000,
    ],
    ids=["conflicting lengths", "not chunked last", "unasked upgrade", "endless head"],
)
def test_a_response_that_cannot_be_relayed_safely_is_broken_before_any_write(
    response: bytes,
) -> None:
    r, client, events = reader()
    r.feed(response)
    assert client.out == b""
    assert [kind for kind, _ in events.seen][-1] == "broken"


def test_an_endless_trailer_line_is_bounded() -> None:
    r, _, events = reader()
    r.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX: ")
    for _ in range(40):
        r.feed(b"v" * 8192)
    assert ("broken", "response trailers too large") in events.seen


def test_a_gzip_chunked_response_cannot_reach_an_http10_client() -> None:
    r, client, events = reader(version="1.0")
    r.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
    assert client.out == b""
    assert events.seen[-1] == ("broken", "transfer coding an HTTP/1.0 client cannot take")


def test_a_finished_response_cannot_fail_afterwards() -> None:
    r, _, _ = reader()
    r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(TransitionError):
        r.to(Receive.FAILED)


@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"999"])
def test_a_status_outside_100_599_is_broken(status: bytes) -> None:
    r, client, events = reader()
    r.feed(b"HTTP/1.1 " + status + b" Weird\r\nContent-Length: 0\r\n\r\n")
    assert client.out == b""
    assert events.seen[-1][0] == "broken"
