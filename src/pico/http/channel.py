"""The seams between the proxy engine and whatever carries a request to a service.

A `Channel` is a byte pipe to one service connection (a mux stream through a tunnel, or a TCP
connection to another node's proxy port). An `Upstream` hands out channels and takes idle ones
back for reuse. A `Router` says which upstreams may serve an endpoint, best first. A
`ClientSide` is what an exchange needs of the client connection it answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from pico.mux.frame import ResetReason

if TYPE_CHECKING:
    from pico.http.head import Headers
    from pico.http.request import Request
    from pico.http.settings import ForwardProof, ProxyLimits

__all__ = [
    "Cancellable",
    "Channel",
    "ChannelReceiver",
    "ClientSide",
    "ResetReason",
    "ResponseTimer",
    "Router",
    "Upstream",
    "UpstreamBusy",
    "UpstreamUnavailable",
]


class UpstreamUnavailable(Exception):
    """The upstream cannot open a channel now (tunnel closing, node unreachable)."""


class UpstreamBusy(UpstreamUnavailable):
    """The upstream is at its limit of channels open at once (`upstream.max_streams_per_tunnel`)."""


class ChannelReceiver(Protocol):
    """Callbacks from a channel (the shape of asyncio.Protocol)."""

    def data_received(self, data: bytes | memoryview) -> None: ...
    def eof_received(self) -> None: ...
    def connection_lost(self, reason: ResetReason | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


class Channel(Protocol):
    """A bidirectional byte stream to one service connection, used like a transport."""

    @property
    def closed(self) -> bool: ...
    def set_receiver(self, receiver: ChannelReceiver) -> None: ...
    def write(self, data: bytes | memoryview) -> None: ...
    def write_eof(self) -> None: ...
    def reset(self, reason: ResetReason = ResetReason.CANCELLED) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Upstream(Protocol):
    """Something that can carry requests for an endpoint: a local tunnel or a remote node."""

    @property
    def label(self) -> str: ...
    @property
    def remote(self) -> bool: ...
    def open_channel(self, fresh: bool = False) -> tuple[Channel, bool]:
        """Return a channel and whether it was reused from the idle pool (never when `fresh`).

        Raises UpstreamUnavailable when no channel can be opened.
        """
        ...

    def release_channel(self, channel: Channel) -> None:
        """Take back a channel whose exchange finished cleanly, for keep-alive reuse."""
        ...


class Cancellable(Protocol):
    """A registration that can be withdrawn."""

    def cancel(self) -> None: ...


class ResponseTimer(Protocol):
    """Bounds the wait for a response head (a `LazyTimer`)."""

    @property
    def armed(self) -> bool: ...
    def arm(self, delay: float) -> None: ...
    def cancel(self) -> None: ...


class Router(Protocol):
    """Chooses the upstreams for a request."""

    def wait_for_upstream(
        self, endpoint_id: str, callback: Callable[[], None], *, known: bool = False
    ) -> Cancellable | None:
        """Call `callback` once an upstream of `endpoint_id` appears.

        Returns None (no wait) unless the endpoint is known to have had upstreams recently
        (or the caller knows it, `known`), so that a request for an unknown endpoint is
        answered at once.
        """
        ...

    def candidates(self, endpoint_id: str, forwarded: bool) -> Sequence[Upstream]:
        """Upstreams able to serve `endpoint_id`, in the order to try them.

        `forwarded` is true for a request another node sent us: it must be served locally.
        """
        ...


class ClientSide(Protocol):
    """What an exchange needs of its client connection (a `ProxyConnection`)."""

    limits: ProxyLimits
    router: Router
    client_ip: str
    trusted_client: bool  # a listed proxy: its X-Forwarded-Proto/-Host are kept
    scheme: bytes  # b"http" or b"https": how the client reached us
    forward_proof: ForwardProof | None  # marks requests forwarded to other nodes

    @property
    def response_timer(self) -> ResponseTimer: ...
    @property
    def write_paused(self) -> bool: ...
    def write(self, data: bytes | memoryview) -> None: ...
    def writelines(self, parts: tuple[bytes, ...]) -> None: ...
    def cork(self) -> bool: ...
    def uncork(self) -> None: ...
    def hold_body(self, req: Request, data: bytes) -> None: ...
    def release_held_body(self, req: Request) -> None: ...
    def pause_reading_for_channel(self) -> None: ...
    def resume_reading_for_channel(self) -> None: ...
    def start_splice(self, channel: Channel) -> None: ...
    def abort(self) -> None: ...
    def finish_exchange(
        self,
        req: Request,
        status: int,
        bytes_out: int,
        upstream: str,
        *,
        remote: bool,
        close: bool,
        response_headers: Headers | None = None,
    ) -> None: ...
