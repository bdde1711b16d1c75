"""Which local address a node forwards from (the one the other nodes know it by)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pico.server.forward import NodeUpstream, bindable_source, connect_from


@pytest.mark.parametrize(
    ("advertised", "source"),
    [
        ("127.0.0.1", "127.0.0.1"),  # a local address: forwarded requests leave from it
        ("0.0.0.0", ""),  # no address at all
        ("pico-1.pico", ""),  # a name: the kernel picks the address
        ("203.0.113.5", ""),  # not this machine's (a NAT's public address, say)
    ],
)
def test_a_node_forwards_from_its_advertised_address_only_when_it_can(
    advertised: str, source: str
) -> None:
    assert bindable_source(advertised) == source


def test_the_source_is_used_only_towards_a_literal_address_of_its_family() -> None:
    assert NodeUpstream("b", "127.0.0.62:8000", source="127.0.0.61").source == "127.0.0.61"
    assert NodeUpstream("b", "[::1]:8000", source="127.0.0.61").source is None
    assert NodeUpstream("b", "pico-2:8000", source="127.0.0.61").source is None
    assert NodeUpstream("b", "127.0.0.62:8000").source is None


async def test_a_connection_from_a_source_address_picks_its_port_when_it_connects() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.62", 0)
    port = server.sockets[0].getsockname()[1]
    sock = await connect_from("127.0.0.61", "127.0.0.62", port)
    try:
        assert sock.getsockname()[0] == "127.0.0.61"
        assert sock.getsockopt(socket.IPPROTO_IP, 24) == 1  # IP_BIND_ADDRESS_NO_PORT
    finally:
        sock.close()
        server.close()
        await server.wait_closed()
