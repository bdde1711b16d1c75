"""Which local address a node forwards from (the one the other nodes know it by)."""

from __future__ import annotations

import pytest

from pico.server.forward import NodeUpstream, bindable_source


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
