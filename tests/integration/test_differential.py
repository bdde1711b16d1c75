"""Differential test: Pico carries a request as an nginx `proxy_pass` hop does.

Hypothesis generates requests (every method, origin-form targets with queries, `OPTIONS *`,
header names in mixed case, duplicate headers, `Connection` naming any header, bodies with
Content-Length or chunked with extensions and trailers, written in several pieces, 1-3 pipelined
on one connection). The same bytes go through three routes, each to its own recorder (h11):
nginx, Pico one node (node, agent, service) and Pico forwarded (node, node, agent, service).

For every input each Pico route either refuses a request with its own JSON 4xx/5xx, or its
service sees what nginx's service saw: the same number of requests, and for each the same
method, target, header multiset and body bytes. Then a victim request on a new connection to
each Pico route must arrive alone and intact.

Differences accepted, and why:

* Pico may refuse what nginx forwards (its own JSON error): allowed by design; counted by error
  message in the summary.
* nginx refuses `OPTIONS *` (asterisk-form, RFC 9112 §3.2.4) with 400; Pico forwards it, and its
  service must then see exactly the request that was sent.
* Hop-by-hop headers are not compared: X-Forwarded-* (Pico adds them, nginx is not configured
  to), Connection, Keep-Alive, TE, Trailer, Upgrade, Proxy-*, and any header named in a
  Connection token (Pico drops those, nginx does not honour Connection tokens). Host,
  Content-Length and Transfer-Encoding are always compared even when a Connection token names
  them: they route and frame the request, and dropping them is the desync this test looks for.
* Framing: nginx re-frames a chunked body it has already received in full as Content-Length.
  When nginx's framing header differs from the client's, the framing headers are not compared
  (the body bytes still are); when nginx kept the client's framing, Pico must keep it too.
* Chunk extensions and trailers are not compared: nginx drops both when it re-frames a body
  (the smuggling suite checks what Pico does with trailers).
* Header values are compared as h11 parses them (surrounding whitespace stripped), names
  case-insensitively (h11 lowercases them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pico.devtools.nginx import nginx_binary
from pico.server.node import Node
from tests.support.cluster import Harness, wait_for
from tests.support.recorder import (
    RecordedRequest,
    Recorder,
    RecorderError,
    assert_victim_intact,
    serve_through_pico,
    start_recorder,
)
from tests.support.services import RawConnection, RawResponse

NGINX = nginx_binary()

# Enough to cover the strategy's shapes in well under a minute on 2 cores.
MAX_EXAMPLES = 800

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
}}
"""

# -- the generated requests ---------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One generated request: its exact bytes, and what a faithful proxy passes on."""

    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]  # as written, framing and Connection included
    framing: tuple[tuple[bytes, bytes], ...]  # ("content-length", n) or ("transfer-encoding", ...)
    body: bytes
    wire: bytes

    @property
    def connection_tokens(self) -> frozenset[bytes]:
        tokens = (
            t.strip().lower()
            for n, v in self.headers
            if n.lower() == b"connection"
            for t in v.split(b",")
        )
        return frozenset(t for t in tokens if t)

    @property
    def closes(self) -> bool:
        return b"close" in self.connection_tokens


@dataclass(frozen=True)
class Example:
    requests: tuple[Sent, ...]
    pieces: tuple[bytes, ...]  # the joined bytes, as written


HOST = b"ep.example.com"
COMMON_NAMES = [b"Accept", b"Accept-Language", b"Cache-Control", b"Cookie", b"Pragma"]
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD"]

segments = st.from_regex(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,8}", fullmatch=True)
query_parts = st.from_regex(r"[A-Za-z0-9]{1,5}=[A-Za-z0-9%._-]{0,6}", fullmatch=True)
values = st.from_regex(r"[!-~]([ !-~]{0,24}[!-~])?", fullmatch=True)
extra_names = st.from_regex(r"X-[A-Za-z0-9]{1,8}", fullmatch=True)


@st.composite
def mixed_case(draw: st.DrawFn, text: bytes) -> bytes:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return bytes(
        c ^ 0x20 if flip and chr(c).isalpha() else c for c, flip in zip(text, flips, strict=True)
    )


@st.composite
def targets(draw: st.DrawFn, method: bytes) -> bytes:
    if method == b"OPTIONS" and draw(st.integers(0, 4)) == 0:
        return b"*"
    path = "/" + "/".join(draw(st.lists(segments, max_size=3)))
    if draw(st.booleans()):
        path += "?" + "&".join(draw(st.lists(query_parts, min_size=1, max_size=3)))
    return path.encode()


@st.composite
def chunked_body(draw: st.DrawFn, body: bytes) -> tuple[bytes, bytes]:
    """The chunked encoding of `body` (random chunking, extensions, trailers) and a Trailer
    header value (b"" for none)."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=2))))
    cuts = [c for c in cuts if 0 < c < len(body)]
    parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if body[a:b]]
    out = b""
    for part in parts:
        size = format(len(part), "x")
        if draw(st.booleans()):
            size = size.upper()
        out += size.encode() + draw(extensions()) + b"\r\n" + part + b"\r\n"
    out += b"0" + draw(extensions()) + b"\r\n"
    names = draw(st.lists(extra_names, max_size=2, unique_by=str.lower))
    for name in names:
        out += name.encode() + b": " + draw(values).encode() + b"\r\n"
    announced = draw(st.booleans())
    announce = b", ".join(n.encode() for n in names) if announced else b""
    return out + b"\r\n", announce


@st.composite
def extensions(draw: st.DrawFn) -> bytes:
    exts = draw(
        st.lists(st.from_regex(r";[a-z]{1,4}(=[A-Za-z0-9]{1,4})?", fullmatch=True), max_size=2)
    )
    return "".join(exts).encode()


@st.composite
def requests(draw: st.DrawFn) -> Sent:
    method = draw(st.sampled_from(METHODS))
    target = draw(targets(method))
    headers: list[tuple[bytes, bytes]] = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(st.sampled_from(COMMON_NAMES), extra_names.map(str.encode)))
        headers.append((draw(mixed_case(name)), draw(values).encode()))
    duplicate = draw(st.booleans())
    if headers and duplicate:  # one header again, in another case and with another value
        name = draw(st.sampled_from([n for n, _ in headers]))
        headers.append((draw(mixed_case(name)), draw(values).encode()))
    host = draw(st.one_of(st.just(HOST), mixed_case(HOST)))
    headers.insert(draw(st.integers(0, len(headers))), (draw(mixed_case(b"Host")), host))
    kind = "none" if method == b"HEAD" else draw(st.sampled_from(["none", "length", "chunked"]))
    body = b"" if kind == "none" else draw(st.binary(max_size=40))
    framing: tuple[tuple[bytes, bytes], ...] = ()
    encoded = body
    if kind == "length":
        framing = ((b"content-length", b"%d" % len(body)),)
        headers.append((draw(mixed_case(b"Content-Length")), b"%d" % len(body)))
    elif kind == "chunked":
        framing = ((b"transfer-encoding", b"chunked"),)
        headers.append((draw(mixed_case(b"Transfer-Encoding")), draw(mixed_case(b"chunked"))))
        encoded, announce = draw(chunked_body(body))
        if announce:
            headers.append((b"Trailer", announce))
    for _ in range(draw(st.integers(0, 2))):
        tokens = draw(st.lists(connection_tokens(headers), min_size=1, max_size=3))
        position = draw(st.integers(0, len(headers)))
        headers.insert(position, (draw(mixed_case(b"Connection")), b", ".join(tokens)))
    head = method + b" " + target + b" HTTP/1.1\r\n"
    head += b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    return Sent(method, target, tuple(headers), framing, body, head + b"\r\n" + encoded)


def connection_tokens(headers: list[tuple[bytes, bytes]]) -> st.SearchStrategy[bytes]:
    named = [b"content-length", b"transfer-encoding", b"host", b"keep-alive", b"close"]
    return st.one_of(
        st.sampled_from(named + [n for n, _ in headers]),
        extra_names.map(str.encode),
    ).flatmap(mixed_case)


@st.composite
def examples(draw: st.DrawFn) -> Example:
    sent = tuple(draw(st.lists(requests(), min_size=1, max_size=3)))
    wire = b"".join(r.wire for r in sent)
    cuts = sorted(set(draw(st.lists(st.integers(1, len(wire) - 1), max_size=3))))
    pieces = tuple(wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True))
    return Example(sent, pieces)


# -- the three routes ----------------------------------------------------------------------


@dataclass
class Route:
    """Where the client connects, and the recorder behind it."""

    name: str
    port: int
    recorder: Recorder
    entry: Node | None = None  # the Pico node clients connect to; None for nginx


@dataclass
class Stats:
    examples: int = 0
    requests: int = 0
    nginx_forwarded: int = 0
    pico_forwarded: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        accepted = ", ".join(f"{why}: {n}" for why, n in sorted(self.accepted.items()))
        forwarded = ", ".join(f"{name} {n}" for name, n in sorted(self.pico_forwarded.items()))
        return (
            f"differential: {self.examples} examples, {self.requests} requests; forwarded by "
            f"nginx {self.nginx_forwarded}, {forwarded}; "
            f"{sum(self.accepted.values())} differences accepted, counted per Pico route "
            f"({accepted or 'none'})"
        )


@dataclass
class PicoRoutes:
    """Pico one node and Pico forwarded, each to its own recorder; `close()` stops them."""

    harness: Harness
    recorders: list[Recorder]
    routes: list[Route]

    async def close(self) -> None:
        await self.harness.close()
        for rec in self.recorders:
            await rec.close()


async def start_pico_routes() -> PicoRoutes:
    started = PicoRoutes(Harness(), [], [])
    try:
        for name in ("Pico one node", "Pico forwarded"):
            rec = await start_recorder()
            started.recorders.append(rec)
            entry = await serve_through_pico(
                started.harness, rec, forwarded=name == "Pico forwarded"
            )
            assert entry.addrs is not None
            started.routes.append(Route(name, entry.addrs.proxy[1], rec, entry))
    except BaseException:
        await started.close()
        raise
    return started


@dataclass
class Bench:
    loop: asyncio.AbstractEventLoop
    nginx: Route
    pico: PicoRoutes

    def restart_pico(self) -> None:
        """Replace the Pico routes: after a failed example, bytes of it may still be on their
        way to a service and would land in the next example (nginx pools no connection)."""
        self.loop.run_until_complete(self.pico.close())
        self.pico = self.loop.run_until_complete(start_pico_routes())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def accepts(port: int, nginx: subprocess.Popen[bytes]) -> bool:
    assert nginx.poll() is None, f"nginx exited with {nginx.returncode}"
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def start_nginx(directory: Path, upstream: int) -> tuple[subprocess.Popen[bytes], int]:
    assert NGINX is not None, "nginx is required for the differential test (installed by .ci/run)"
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, port=port, upstream=upstream))
    command = [NGINX, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    """nginx and the two Pico routes, each to its own recorder, on one event loop for the
    module (hypothesis runs each example on it with `run_until_complete`)."""
    loop = asyncio.new_event_loop()
    nginx_recorder = loop.run_until_complete(start_recorder())
    nginx: subprocess.Popen[bytes] | None = None
    pico: PicoRoutes | None = None
    try:
        nginx, port = start_nginx(tmp_path_factory.mktemp("nginx"), nginx_recorder.port)
        loop.run_until_complete(wait_for(lambda: accepts(port, nginx), what="nginx listens"))
        pico = loop.run_until_complete(start_pico_routes())
        bench = Bench(loop, Route("nginx", port, nginx_recorder), pico)
        yield bench
        pico = bench.pico  # replaced after each failed example
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        if pico is not None:
            loop.run_until_complete(pico.close())
        loop.run_until_complete(nginx_recorder.close())
        loop.close()


# -- one example through one route ----------------------------------------------------------


@dataclass
class Outcome:
    responses: list[RawResponse]
    recorded: list[RecordedRequest]  # what the route's service saw, in order
    refused: list[RecorderError]  # what the service's parser refused


class _KeepsBytesOnReset(asyncio.StreamReaderProtocol):
    """A reset reads as EOF: asyncio's streams would otherwise raise it before handing over
    the response bytes already received (a server that refuses a request and closes with more
    of the pipeline unread resets the connection)."""

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(None)


async def open_client(port: int) -> RawConnection:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    transport, protocol = await loop.create_connection(
        lambda: _KeepsBytesOnReset(reader), "127.0.0.1", port
    )
    return RawConnection(reader, asyncio.StreamWriter(transport, protocol, reader, loop))


async def run(route: Route, example: Example) -> Outcome:
    rec = route.recorder
    before, errors_before = len(rec.requests), len(rec.errors)
    conn = await open_client(route.port)
    responses: list[RawResponse] = []
    try:
        with contextlib.suppress(ConnectionError):  # a refusal may close before all is sent
            for piece in example.pieces:
                await conn.send(piece)
                await asyncio.sleep(0)  # the in-process nodes read each piece on its own
        for sent in example.requests:
            try:
                resp = await conn.read_response(head_request=sent.method == b"HEAD", timeout=5)
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # closed: no further answers
            except ValueError as exc:  # e.g. a body after the answer to HEAD
                raise AssertionError(f"{route.name}: unreadable response: {exc}") from exc
            responses.append(resp)
            if (resp.header("connection") or "").lower() == "close":
                break
    finally:
        await conn.close()
    await rec.wait_settled()
    return Outcome(responses, rec.requests[before:], rec.errors[errors_before:])


# -- what each route did with each request ---------------------------------------------------


@dataclass(frozen=True)
class Forwarded:
    record: RecordedRequest


@dataclass(frozen=True)
class Refused:
    status: int
    why: str


@dataclass(frozen=True)
class NotAnswered:
    pass


Result = Forwarded | Refused | NotAnswered

_OK = re.compile(rb"ok (\d+)")


def pico_error(resp: RawResponse, method: bytes) -> str | None:
    """The message of a Pico JSON error, or None if `resp` is not one."""
    if resp.header("content-type") != "application/json":
        return None
    if method == b"HEAD" and resp.status >= 400:
        return "(no body: HEAD)"
    try:
        body = json.loads(resp.body)
    except ValueError:
        return None
    if isinstance(body, dict) and list(body) == ["error"] and isinstance(body["error"], str):
        return body["error"]
    return None


def results(route: Route, example: Example, outcome: Outcome) -> list[Result]:
    """Each request's fate; asserts that the service saw exactly the requests it answered."""
    assert outcome.refused == [], f"{route.name} sent what the service cannot parse: {example}"
    out: list[Result] = []
    records = iter(outcome.recorded)
    forwarded = 0
    for i, sent in enumerate(example.requests):
        if i >= len(outcome.responses):
            out.append(NotAnswered())
            continue
        resp = outcome.responses[i]
        if route.entry is not None and (why := pico_error(resp, sent.method)) is not None:
            out.append(Refused(resp.status, why))
            continue
        match = _OK.fullmatch(resp.body)
        if route.entry is None and resp.status >= 400 and match is None:
            out.append(Refused(resp.status, "nginx"))
            continue
        record = next(records, None)
        assert record is not None, (
            f"{route.name}: answer {resp.status} {resp.body!r} without a request"
        )
        assert resp.status == 200, f"{route.name}: the service answered {resp.status} {resp.body!r}"
        if sent.method == b"HEAD":
            assert resp.header("content-length") == str(len(b"ok %d" % record.number))
        else:
            assert resp.body == b"ok %d" % record.number, f"{route.name}: another request's answer"
        assert record.complete, record
        assert route.recorder.errors_on(record.connection) == [], route.recorder.errors
        out.append(Forwarded(record))
        forwarded += 1
    extra = outcome.recorded[forwarded:]
    assert extra == [], f"{route.name}: the service saw requests nobody was answered for: {extra}"
    return out


# Hop-by-hop, or set by the hop: not compared (see the module docstring).
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"te", b"trailer", b"upgrade"})
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_ALWAYS_COMPARED = frozenset({b"host"})


def _compared(name: bytes, named: frozenset[bytes]) -> bool:
    if name in _FRAMING or name in _HOP_BY_HOP:
        return False
    if name.startswith((b"x-forwarded-", b"proxy-")):
        return False
    return name in _ALWAYS_COMPARED or name not in named


def header_multiset(
    headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...], named: frozenset[bytes]
) -> Counter[tuple[bytes, bytes]]:
    return Counter((n.lower(), v.strip(b" \t")) for n, v in headers if _compared(n.lower(), named))


def framing_of(record: RecordedRequest) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((n, v.lower()) for n, v in record.headers if n in _FRAMING)


def assert_same_request(
    where: str, sent: Sent, pico: RecordedRequest, reference: RecordedRequest | None, stats: Stats
) -> None:
    """Pico's service saw what nginx's did (`reference`), or, where nginx refused the request
    for a documented reason (None), exactly what was sent."""
    named = sent.connection_tokens
    if reference is None:
        expected = (sent.method, sent.target, header_multiset(sent.headers, named), sent.framing)
    else:
        expected = (
            reference.method,
            reference.target,
            header_multiset(reference.headers, named),
            framing_of(reference),
        )
    got = (pico.method, pico.target, header_multiset(pico.headers, named), framing_of(pico))
    assert got[:3] == expected[:3], f"{where}: {sent.wire!r}\nPico sent {pico}\nexpected {expected}"
    if expected[3] == sent.framing:
        assert got[3] == sent.framing, f"{where}: framing {got[3]} for {sent.wire!r}"
    else:
        stats.accepted["nginx re-framed the body"] += 1
    assert bytes(pico.body) == sent.body, f"{where}: body {bytes(pico.body)!r} for {sent.wire!r}"
    if reference is not None:
        assert bytes(reference.body) == sent.body, f"nginx: body {bytes(reference.body)!r}"


def compare(
    route: Route, example: Example, nginx: list[Result], pico: list[Result], stats: Stats
) -> None:
    nginx_refused_documented = False  # nginx refused OPTIONS * here or earlier on this connection
    for i, sent in enumerate(example.requests):
        ours, theirs = pico[i], nginx[i]
        if isinstance(theirs, Refused) and sent.target == b"*":
            nginx_refused_documented = True
            stats.accepted["nginx refuses OPTIONS *"] += 1
        match ours:
            case Refused(status=status, why=why):
                assert status >= 400, (status, why)
                stats.accepted[f"Pico refused ({status} {why})"] += 1
            case NotAnswered():
                earlier = example.requests[:i]
                closed = any(s.closes for s in earlier) or any(
                    isinstance(r, Refused) for r in pico[:i]
                )
                assert closed, f"{route.name}: no answer to request {i} of {example.requests}"
            case Forwarded(record=record):
                stats.pico_forwarded[route.name] += 1
                if isinstance(theirs, Forwarded):
                    assert_same_request(route.name, sent, record, theirs.record, stats)
                else:
                    assert nginx_refused_documented, (
                        f"{route.name} forwarded what nginx did not ({theirs}): {sent.wire!r}"
                    )
                    assert_same_request(route.name, sent, record, None, stats)


async def check_example(bench: Bench, example: Example, stats: Stats) -> None:
    stats.examples += 1
    stats.requests += len(example.requests)
    nginx = results(bench.nginx, example, await run(bench.nginx, example))
    stats.nginx_forwarded += sum(isinstance(r, Forwarded) for r in nginx)
    for route in bench.pico.routes:
        pico = results(route, example, await run(route, example))
        compare(route, example, nginx, pico, stats)
    for route in bench.pico.routes:
        assert route.entry is not None
        await assert_victim_intact(route.entry, route.recorder)


def test_pico_passes_on_what_an_nginx_proxy_pass_hop_passes_on(bench: Bench) -> None:
    stats = Stats()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        # One bug at a time: shrinking several distinct failures takes minutes.
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(example=examples())
    def check(example: Example) -> None:
        try:
            bench.loop.run_until_complete(check_example(bench, example, stats))
        except BaseException:
            bench.restart_pico()
            raise

    try:
        check()
    finally:
        print("\n" + stats.summary())
    # Refusing everything would pass the comparison: most requests must really be compared.
    for route in bench.pico.routes:
        assert stats.pico_forwarded[route.name] >= stats.nginx_forwarded // 2, stats.summary()
