"""How the agent connects one stream to its service: the `Dialer` seam.

`EndpointLink` owns everything around a stream (reconnect, GoAway drain, limits, metrics,
what a failed dial means to the node); a `Dialer` only connects. `TcpDialer` is a TCP (or TLS)
connection per stream, spliced when the tunnel splices; `UnixDialer` a Unix socket connection;
`pico.agent.inprocess.InProcessDialer` an asyncio protocol in this process (the SDK).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Protocol

from pico.agent.service import ServiceSide, SplicedServiceSide
from pico.config import EndpointSpec
from pico.mux.stream import MuxStream


class Dialer(Protocol):
    """Connects a stream the node opened to the service."""

    @property
    def service(self) -> str:
        """Where streams go, for logs (host:port, unix:PATH, in-process)."""

    async def dial(self, stream: MuxStream, on_done: Callable[[], None]) -> None:
        """Connect `stream`; `on_done()` is called once when the connection is over.

        Raises ConnectionRefusedError (nobody listens: the node may retry elsewhere),
        ssl.SSLError, or another OSError (unreachable). The caller bounds it with a timeout
        (TimeoutError) and may cancel it: nothing is left open then.
        """


class TcpDialer:
    """A TCP connection per stream (TLS when `tls` is given); spliced when the tunnel can."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.tls = tls

    @property
    def service(self) -> str:
        return f"{self.host}:{self.port}"

    async def dial(self, stream: MuxStream, on_done: Callable[[], None]) -> None:
        # TLS to the service means its bytes are decrypted here: copied, never spliced.
        splice = stream.tunnel.splicing and self.tls is None
        side = SplicedServiceSide if splice else ServiceSide
        await asyncio.get_running_loop().create_connection(
            lambda: side(stream, on_done),
            self.host,
            self.port,
            ssl=self.tls,
            server_hostname=self.host if self.tls is not None else None,
        )


class UnixDialer:
    """A Unix socket connection per stream (copied: splicing is for TCP services)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @property
    def service(self) -> str:
        return f"unix:{self.path}"

    async def dial(self, stream: MuxStream, on_done: Callable[[], None]) -> None:
        await asyncio.get_running_loop().create_unix_connection(
            lambda: ServiceSide(stream, on_done), self.path
        )


def dialer_for(spec: EndpointSpec, service_tls: ssl.SSLContext) -> Dialer:
    """The dialer of a configured endpoint (`service_tls` for https services)."""
    if spec.unix_path:
        return UnixDialer(spec.unix_path)
    return TcpDialer(spec.host, spec.port, service_tls if spec.tls else None)
