"""What the proxy engine is configured with and what it reports.

`ProxyLimits` (each limit protects the node from one kind of slow or big client),
`RequestRecord` (what an observer learns about each finished request: metrics, access log) and
`ConnectionTracker` (the open client connections, for graceful shutdown, at most so many per
client address: `AddressLimit`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from pico.http.proxy import ProxyConnection


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """Limits of the proxy port; each protects the node from one kind of slow or big client."""

    # Request line plus headers; bigger heads get 431 (memory per connection is bounded).
    max_header_bytes: int = 64 * 1024
    # A client must send a complete head within this (slowloris protection); 0 disables.
    read_header_timeout: float = 10.0
    # An idle keep-alive client connection is closed after this; 0 disables.
    idle_timeout: float = 300.0
    # Bounds the wait for the upstream's response head only (never a streaming body); 0 disables.
    response_timeout: float = 30.0
    # Request bytes kept to replay on another upstream if the agent could not reach the service.
    replay_limit: int = 64 * 1024
    # Bytes of pipelined requests buffered before we stop reading the client.
    pipeline_limit: int = 256 * 1024
    # How long a request may wait for an upstream when its endpoint just lost all of them (a
    # node restarting or dying, its agents reconnecting elsewhere); 0 answers 502 at once.
    upstream_wait: float = 5.0
    # Client write buffer high-water mark; above it we stop crediting the upstream.
    write_high_water: int = 256 * 1024
    # Load balancers whose X-Forwarded-Proto/-Host are believed (`proxy.trusted_proxies`);
    # from anyone else they are replaced by what the node saw.
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()

    def trusts(self, ip: str) -> bool:
        """Whether `ip` is one of the trusted proxies."""
        if not self.trusted_proxies:
            return False
        try:
            addr = ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.trusted_proxies)


class RequestRecord(NamedTuple):
    """What an observer learns about a finished request (metrics, access log).

    A NamedTuple, not a frozen dataclass: one is built per request, and a frozen dataclass's
    `__init__` (one `object.__setattr__` per field) cost 2.5 us of the node's ~40 us.
    """

    method: str
    host: str
    path: str
    status: int
    duration: float
    bytes_in: int
    bytes_out: int
    endpoint: str
    upstream: str
    forwarded: bool
    remote: bool
    client_ip: str = ""
    request_headers: Sequence[tuple[bytes, bytes]] = ()
    response_headers: Sequence[tuple[bytes, bytes]] = ()


class Admission(NamedTuple):
    """What `RequestAuth.admit` decided."""

    refusal: tuple[int, str] | None  # the status (401/403) and message to answer; None: go on
    # When the token expires (epoch seconds), if a connection the request upgrades must end
    # then (`proxy.auth.disable_disconnect_on_expiry` off); else None.
    expires: float | None = None


class RequestAuth(Protocol):
    """Decides whether a client request may reach its endpoint (the proxy port's tokens)."""

    def admit(self, credentials: bytes | None, endpoint_id: str) -> Admission:
        """Whether the request may go on, and until when an upgraded connection may last.

        `credentials` is the `x-pico-authorization` (or `Authorization`) value, if any.
        """
        ...


class ForwardProof(Protocol):
    """Proves that a request came from another member (the cluster's gossip keys)."""

    def mark(self, method: bytes, target: bytes) -> bytes:
        """The `x-pico-forward` value for a request this node forwards."""
        ...

    def verify(self, value: bytes, method: bytes, target: bytes) -> bool:
        """Whether an `x-pico-forward` value proves a member sent this request."""
        ...


Observer = Callable[[RequestRecord], None]


class AddressLimit:
    """Open connections per client IP address, at most `limit` each (0: no limit).

    It protects a port's descriptors and memory from one address; addresses are dropped
    when their last connection closes, so the table holds only what is open.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def add(self, ip: str) -> bool:
        """Count a new connection from `ip`; False (not counted) if it is over the limit."""
        n = self._open.get(ip, 0)
        if self.limit and n >= self.limit:
            return False
        self._open[ip] = n + 1
        return True

    def remove(self, ip: str) -> None:
        """A connection counted by `add` closed."""
        n = self._open.get(ip, 0) - 1
        if n > 0:
            self._open[ip] = n
        else:
            self._open.pop(ip, None)

    def count(self, ip: str) -> int:
        """Connections open from `ip`."""
        return self._open.get(ip, 0)


class ConnectionTracker:
    """The open client connections of a proxy port, for graceful shutdown.

    With `per_ip`, a connection from an address that already has `per_ip.limit` open ones is
    refused by `add` (`on_refused` is called); `exempt(ip)` addresses are never limited.
    """

    def __init__(
        self,
        per_ip: AddressLimit | None = None,
        exempt: Callable[[str], bool] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._conns: set[ProxyConnection] = set()
        self._empty = asyncio.Event()
        self._empty.set()
        self.per_ip = per_ip
        self.exempt = exempt
        self.on_refused = on_refused
        self._counted: dict[ProxyConnection, str] = {}  # connections counted per IP

    def add(self, conn: ProxyConnection, ip: str = "") -> bool:
        """Track `conn` (from `ip`); False if its address is over the limit (not tracked)."""
        per_ip = self.per_ip
        if per_ip is not None and per_ip.limit and ip:
            if per_ip.add(ip):
                self._counted[conn] = ip
            elif self.exempt is None or not self.exempt(ip):  # asked only when over
                if self.on_refused is not None:
                    self.on_refused(ip)
                return False
        self._conns.add(conn)
        self._empty.clear()
        return True

    def discard(self, conn: ProxyConnection) -> None:
        self._conns.discard(conn)
        ip = self._counted.pop(conn, None)
        if ip is not None and self.per_ip is not None:
            self.per_ip.remove(ip)
        if not self._conns:
            self._empty.set()

    def __len__(self) -> int:
        return len(self._conns)

    def snapshot(self) -> list[ProxyConnection]:
        """The connections open now."""
        return list(self._conns)

    async def wait_empty(self) -> None:
        """Return once every connection has closed."""
        await self._empty.wait()
