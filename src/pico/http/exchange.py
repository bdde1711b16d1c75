"""One request carried through one upstream channel, and its response relayed back.

`Request` is a parsed client request; `Exchange` sends it through a `Channel`, retries where that
is safe (dial failures, stale keep-alive streams), parses the response only to find where it ends,
and relays it to the client as it arrives. `ProxyConnection` (proxy.py) owns both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httptools

from pico import log
from pico.http.channel import Cancellable, Channel, ResetReason, Upstream, UpstreamUnavailable
from pico.http.head import (
    UNDELIVERED_HEADER,
    error_response,
    rewrite_request_head,
    rewrite_response_head,
)
from pico.http.request import Request

if TYPE_CHECKING:
    from pico.http.proxy import ProxyConnection

_log = log.get_logger("proxy")

# A response head bigger than this is refused (502): it protects the node's memory.
_MAX_RESPONSE_HEAD = 256 * 1024
# A request that may have reached the service is only re-sent if repeating it is harmless.
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

_DIAL_FAILURES = {
    ResetReason.REJECTED: (502, "upstream unreachable"),
    ResetReason.REFUSED: (502, "upstream unreachable"),
    ResetReason.UNREACHABLE: (502, "upstream unreachable"),
    ResetReason.TIMEOUT: (504, "upstream timeout"),
}


class Exchange:
    """One request carried through one channel, and its response relayed back."""

    __slots__ = (
        "body_ended",
        "body_left",
        "bytes_out",
        "candidates",
        "channel",
        "chunked_out",
        "close_client",
        "conn",
        "done",
        "feeding",
        "got_bytes",
        "head_bytes",
        "head_sent",
        "head_size",
        "headers",
        "held_once",
        "hold",
        "hold_failure",
        "parser",
        "progress_mark",
        "reason",
        "replay",
        "replay_size",
        "request",
        "response_headers",
        "retire",
        "retried_fresh",
        "reused",
        "status",
        "stray_bytes",
        "tried",
        "undelivered",
        "until_close",
        "upstream",
    )

    def __init__(self, conn: ProxyConnection, request: Request, candidates: list[Upstream]) -> None:
        self.conn = conn
        self.request = request
        self.candidates = candidates
        self.channel: Channel | None = None
        self.upstream: Upstream | None = None
        self.reused = False
        self.retried_fresh = False
        self.replay: list[bytes] | None = []
        self.replay_size = 0
        self.progress_mark = 0  # request bytes received when the response timer last fired
        self.parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.response_headers: list[tuple[bytes, bytes]] = []  # as received, for the access log
        self.head_sent = False  # response head written to the client
        self.got_bytes = False  # any response byte received on this channel
        self.chunked_out = False
        # Bytes of a Content-Length response body still to come: once the parser is past the
        # head, they are relayed as they arrive without it (no copy, no callbacks).
        self.body_left = 0
        self.until_close = False
        self.close_client = False
        self.done = False
        self.bytes_out = 0
        self.body_ended = False  # the end of the request body went out on the channel
        self.head_bytes = 0  # response bytes received before the head was complete
        self.head_size = 0  # status, header names and values parsed so far
        self.feeding = False  # inside parser.feed_data
        self.retire: tuple[Channel, bool] | None = None  # channel decision after the feed
        self.stray_bytes = False  # the upstream sent more than one response
        self.undelivered = False  # the node we forwarded to answered "not delivered"
        # Waiting for an upstream to (re)appear (a node restart or failure): the hold, and
        # the answer to give if none appears in time.
        self.hold: Cancellable | None = None
        self.held_once = False
        self.tried: set[int] = set()  # ids of the upstreams this request was sent to
        self.hold_failure = (502, "no available upstreams")

    # -- request side ----------------------------------------------------------------------------

    def start(self) -> None:
        """Send the request to the best candidate that can open a channel."""
        while self.candidates:
            upstream = self.candidates[0]
            try:
                # A non-idempotent request never rides a pooled connection the service may
                # have closed meanwhile: it could not be retried safely.
                fresh = self.retried_fresh or self.request.method not in _IDEMPOTENT
                channel, reused = upstream.open_channel(fresh=fresh)
            except UpstreamUnavailable:
                self.candidates.pop(0)
                continue
            self.tried.add(id(upstream))
            self._attach(upstream, channel, reused)
            return
        failure = (502, "upstream unreachable" if self.upstream else "no available upstreams")
        if not self._hold(failure):
            self._fail(*failure, undelivered=True)

    def _hold(self, failure: tuple[int, str], *, known: bool = False) -> bool:
        """Wait (once, bounded) for an upstream of an endpoint that just lost all of its own.

        Only a request that never reached a service is held, and only if the router knows the
        endpoint was served recently: an unknown endpoint still gets its 502 at once.
        """
        wait = self.conn.limits.upstream_wait
        if self.held_once or wait <= 0 or self.replay is None or self.got_bytes:
            return False
        req = self.request
        if req.forwarded:
            return False  # the node that forwarded it decided; answer it at once
        # An upstream may have appeared while this request was trying the others (an agent
        # re-registered, gossip announced another node): use it now rather than wait.
        fresh = [
            u
            for u in self.conn.router.candidates(req.endpoint, req.forwarded)
            if id(u) not in self.tried
        ]
        if fresh:
            self.held_once = True
            self.candidates = fresh
            self.retried_fresh = False
            self.start()
            return True
        # `known`: the upstream refused it while leaving, which proves the endpoint is served.
        hold = self.conn.router.wait_for_upstream(req.endpoint, self._hold_over, known=known)
        if hold is None:
            return False
        self.held_once = True
        self.hold = hold
        self.hold_failure = failure
        self.conn.response_timer.arm(wait)
        return True

    def _hold_over(self) -> None:
        """An upstream of the endpoint appeared: route the request again."""
        self.hold = None
        if self.done:
            return
        self._cancel_timer()
        req = self.request
        self.candidates = list(self.conn.router.candidates(req.endpoint, req.forwarded))
        self.upstream = None
        self.retried_fresh = False
        self.start()

    def _attach(self, upstream: Upstream, channel: Channel, reused: bool) -> None:
        req = self.request
        self.upstream = upstream
        self.channel = channel
        self.reused = reused
        self.got_bytes = False
        self.parser = None
        self.headers = []
        self.reason = b""
        channel.set_receiver(self)
        # A pooled channel keeps the read state its last exchange left: set it for this client.
        if self.conn.write_paused:
            channel.pause_reading()
        else:
            channel.resume_reading()
        # The head is rendered for this upstream (a retry may go to another node, or come back
        # to a local tunnel); the body sent so far is replayed after it.
        channel.write(
            rewrite_request_head(
                req.method,
                req.url,
                req.headers,
                client_ip=self.conn.client_ip,
                chunked=req.chunked,
                upgrade=req.upgrade,
                forwarded=req.forwarded,
                mark_forward=upstream.remote,
            )
        )
        for chunk in self.replay or ():
            channel.write(chunk)
        body, req.body = req.body, []
        if body:
            self.conn.release_held_body(req)
        for chunk in body:
            self.send_body(chunk)
        if req.body_done and not self.body_ended:
            self.end_body()
        if not self.conn.response_timer.armed:
            self._arm_timer()

    def _send(self, data: bytes) -> None:
        if self.replay is not None:
            self.replay.append(data)
            self.replay_size += len(data)
            if self.replay_size > self.conn.limits.replay_limit:
                self.replay = None
        assert self.channel is not None
        self.channel.write(data)

    def send_body(self, data: bytes) -> None:
        """Relay a piece of the client's request body (kept until a channel is attached)."""
        if self.done:
            return
        if self.channel is None:
            self.conn.hold_body(self.request, data)
            return
        if self.request.chunked:
            self._send(b"".join((b"%x\r\n" % len(data), data, b"\r\n")))  # one copy, one frame
        else:
            self._send(data)

    def end_body(self) -> None:
        """The client's request body is complete."""
        if self.channel is None or self.done or self.body_ended:
            return
        self.body_ended = True
        if self.request.chunked:
            self._send(b"0\r\n\r\n")
        if self.request.expects_body and not self.head_sent:
            self._arm_timer()  # the wait for the response head starts now

    # -- channel receiver ------------------------------------------------------------------------

    def data_received(self, data: bytes | memoryview) -> None:
        if self.done:
            return
        self.got_bytes = True
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpResponseParser(self)
        conn = self.conn
        corked = conn.cork()
        self.feeding = True
        try:
            if self.body_left and self.head_sent:
                self._relay_body(data)
            else:
                parser.feed_data(data)
                if not self.head_sent and not self.done:
                    # httptools buffers an unfinished header line whole: bound the head by
                    # the raw bytes fed while it is unfinished (body bytes never count).
                    self.head_bytes += len(data)
                    if self.head_bytes > _MAX_RESPONSE_HEAD:
                        self._broken("response head too large")
        except httptools.HttpParserUpgrade as exc:
            if self.status == 101 and self.head_sent:
                rest = data[exc.args[0] :]
                if rest:
                    self.conn.write(rest)
                self._finish_upgrade()
            else:
                self._broken("unexpected upgrade from upstream")
        except httptools.HttpParserError as exc:
            self._broken(f"malformed response from upstream: {exc}")
        finally:
            self.feeding = False
            if self.undelivered:
                self._reroute()
            retire, self.retire = self.retire, None
            if retire is not None:
                self._retire(retire[0], retire[1] and not self.stray_bytes)
            if corked:
                conn.uncork()

    def eof_received(self) -> None:
        if self.done:
            return
        if self.head_sent and self.until_close:
            self._complete()
        else:
            self._channel_failed(None)

    def connection_lost(self, reason: ResetReason | None) -> None:
        if self.done:
            return
        self.channel = None
        if self.head_sent and self.until_close and reason is None:
            self._complete()
        else:
            self._channel_failed(reason)

    def pause_writing(self) -> None:
        self.conn.pause_reading_for_channel()

    def resume_writing(self) -> None:
        self.conn.resume_reading_for_channel()

    # -- client flow control ---------------------------------------------------------------------

    def client_paused(self) -> None:
        if self.channel is not None:
            self.channel.pause_reading()

    def client_resumed(self) -> None:
        if self.channel is not None:
            self.channel.resume_reading()

    def abandon(self, status: int) -> None:
        """The client connection is going away: free the channel and record `status`."""
        if self.done:
            return
        self.done = True
        self._cancel_timer()
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.reset(ResetReason.CANCELLED)
        self._record(status, close=True)

    # -- response parsing (httptools callbacks) --------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            self.stray_bytes = True  # another response after ours: the channel is unusable

    def on_status(self, reason: bytes) -> None:
        if not self.done:
            self.reason += reason
            self.head_size += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_sent and not self.done:
            self.headers.append((name, value))
            self.head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        if self.done:
            return
        if self.head_size > _MAX_RESPONSE_HEAD:  # a head that came whole in one piece
            self._broken("response head too large")
            return
        assert self.parser is not None
        status = self.parser.get_status_code()
        req = self.request
        if 100 <= status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): relay it and keep waiting.
            if req.version != "1.0":
                self.conn.write(
                    rewrite_response_head(
                        status, self.reason, self.headers, chunked=False, close=False, upgrade=False
                    )
                )
            self.headers, self.reason = [], b""
            return
        if (
            status >= 500
            and self.upstream is not None
            and self.upstream.remote
            and any(n.lower() == UNDELIVERED_HEADER for n, _ in self.headers)
        ):
            # The other node could not deliver it either (its agent left, its endpoint moved):
            # no service saw the request, so route it again here instead of passing the 502 on.
            self.undelivered = True
            return
        self._cancel_timer()
        self.status = status
        chunked = False
        lengths = []
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif lname == b"content-length":
                lengths.append(value.strip())
        upgrade = status == 101 and req.upgrade is not None
        no_body = req.method == b"HEAD" or status in (204, 304)
        if upgrade:
            self.until_close = False
        elif not no_body and not chunked and not lengths:
            self.until_close = True
        old_client = req.version == "1.0"
        self.chunked_out = chunked and not old_client and not no_body
        self.close_client = (
            not req.keep_alive
            or self.until_close
            or (chunked and old_client)
            or (req.upgrade is not None and not upgrade)
            or not self.parser.should_keep_alive()
        )
        if chunked and old_client and not no_body:
            self.until_close = False  # de-chunked for an HTTP/1.0 client, ends by closing
        head = rewrite_response_head(
            status,
            self.reason,
            self.headers,
            chunked=self.chunked_out,
            close=self.close_client,
            upgrade=upgrade,
        )
        self.head_sent = True
        self.response_headers, self.headers = self.headers, []
        self.conn.write(head)
        if no_body and not upgrade:
            self._complete()
        elif not chunked and not upgrade and len(lengths) == 1 and lengths[0].isdigit():
            self.body_left = int(lengths[0])

    def on_body(self, body: bytes) -> None:
        if self.done or self.undelivered:
            return
        self.bytes_out += len(body)
        if self.body_left:
            self.body_left -= len(body)
        if self.chunked_out:
            # writelines: no concatenated copy of the body (uvloop sends it with writev).
            self.conn.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
        else:
            self.conn.write(body)

    def on_message_complete(self) -> None:
        if self.undelivered:
            return
        if self.status and not self.done and self.status != 101:
            self._complete()

    def _relay_body(self, data: bytes | memoryview) -> None:
        """The next bytes of a Content-Length body, past the parser (it saw the head only)."""
        left = self.body_left
        n = len(data)
        if n > left:
            self.stray_bytes = True  # bytes after the response: the channel is unusable
            data = data[:left]
            n = left
        self.body_left = left - n
        self.bytes_out += n
        self.conn.write(data)
        if not self.body_left:
            self._complete()

    # -- endings ---------------------------------------------------------------------------------

    def _finish_upgrade(self) -> None:
        channel, self.channel = self.channel, None
        self.done = True
        self._cancel_timer()
        assert channel is not None
        self.conn.start_splice(channel)
        self._record(101)

    def _complete(self) -> None:
        if self.done:
            return
        self.done = True
        self._cancel_timer()
        if self.chunked_out:
            self.conn.write(b"0\r\n\r\n")
        channel, self.channel = self.channel, None
        if channel is not None and not channel.closed:
            reusable = (
                self.request.body_done
                and not self.until_close
                and self.parser is not None
                and self.parser.should_keep_alive()
            )
            if self.feeding:
                # Bytes after this response may still be in the chunk being parsed: decide
                # once it is done (a channel with stray bytes must not be reused).
                self.retire = (channel, reusable)
            else:
                self._retire(channel, reusable)
        self._record(self.status, close=self.close_client)

    def _reroute(self) -> None:
        """The node we forwarded to could not deliver the request: try the next candidate."""
        self.undelivered = False
        self.got_bytes = False  # what came back was only the other node's "not delivered"
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.reset(ResetReason.NORMAL)  # its answer (an error) is not needed
        self._channel_failed(ResetReason.REJECTED)

    def _retire(self, channel: Channel, reusable: bool) -> None:
        if reusable and self.upstream is not None and not channel.closed:
            self.upstream.release_channel(channel)
        else:
            channel.reset(ResetReason.NORMAL)

    def _channel_failed(self, reason: ResetReason | None) -> None:
        """The channel ended before the response did."""
        channel, self.channel = self.channel, None
        if channel is not None and not channel.closed:
            channel.reset(ResetReason.CANCELLED)
        if self.head_sent:
            self._abort_client("upstream closed mid-response")
            return
        replayable = self.replay is not None and not self.got_bytes
        if reason in _DIAL_FAILURES and replayable:
            # The agent could not reach the service: the request never ran, try elsewhere.
            self.candidates.pop(0)
            self.retried_fresh = False
            if self.candidates:
                self.start()
                return
            # Only a node that could not be reached is worth waiting out (its agents are
            # moving); a service that refuses connections will not be fixed by waiting.
            # An agent that is leaving (REJECTED) is worth waiting out too: it reconnects.
            waitable = reason == ResetReason.REJECTED or (
                self.upstream is not None and self.upstream.remote
            )
            rejected = reason == ResetReason.REJECTED
            if not (waitable and self._hold(_DIAL_FAILURES[reason], known=rejected)):
                self._fail(*_DIAL_FAILURES[reason], undelivered=True)
            return
        if (
            self.reused
            and replayable
            and not self.retried_fresh
            and self.request.method in _IDEMPOTENT
        ):
            # An idle pooled stream the service had already closed: retry once on a fresh one.
            self.retried_fresh = True
            self.start()
            return
        if reason in _DIAL_FAILURES:
            status, message = _DIAL_FAILURES[reason]
            self._fail(status, message)
        else:
            self._fail(502, "upstream unreachable")

    def _broken(self, why: str) -> None:
        _log.warn("bad upstream response", endpoint=self.request.endpoint, error=why)
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.reset(ResetReason.PROTOCOL)
        if self.head_sent:
            self._abort_client(why)
        else:
            self._fail(502, "upstream unreachable")

    def _abort_client(self, why: str) -> None:
        self.done = True
        self._cancel_timer()
        self._record(self.status or 502, close=True)
        self.conn.abort()

    def _fail(self, status: int, message: str, *, undelivered: bool = False) -> None:
        self.done = True
        self._cancel_timer()
        req = self.request
        unread = req.expects_body and not req.body_done
        close = not req.keep_alive or unread or req.upgrade is not None
        # Tell the node that forwarded the request that no service saw it: it may try another.
        mark = undelivered and req.forwarded
        self.conn.write(error_response(status, message, close=close, undelivered=mark))
        self._record(status, close=close)

    def _arm_timer(self) -> None:
        self.conn.response_timer.arm(self.conn.limits.response_timeout)

    def on_timeout(self) -> None:
        """The response head did not arrive within `proxy.timeout` (or a hold ran out)."""
        if self.done or self.head_sent:
            return
        if self.hold is not None:
            self.hold.cancel()
            self.hold = None
            self._fail(*self.hold_failure, undelivered=True)
            return
        req = self.request
        if not req.body_done and req.bytes_in != self.progress_mark:
            # Still uploading: the wait for the response head starts after the last byte.
            self.progress_mark = req.bytes_in
            self._arm_timer()
            return
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.reset(ResetReason.CANCELLED)
        self._fail(504, "upstream timeout")

    def _cancel_timer(self) -> None:
        self.conn.response_timer.cancel()
        if self.hold is not None and self.done:
            self.hold.cancel()
            self.hold = None

    def _record(self, status: int, *, close: bool = False) -> None:
        # The parser refers back to this exchange: drop it, so the exchange is freed by its
        # reference count instead of waiting for the cycle collector.
        self.parser = None
        upstream = self.upstream
        label = upstream.label if upstream is not None else ""
        remote = upstream.remote if upstream is not None else False
        self.conn.finish_exchange(
            self.request,
            status,
            self.bytes_out,
            label,
            remote=remote,
            close=close,
            response_headers=self.response_headers,
        )
