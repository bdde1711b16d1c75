"""The TCP join between two gossip transports: one framing (a length, then the message, sealed
with keys), a size limit, and a large cluster state joined in one exchange."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest

from pico.gossip import GossipConfig, Gossiper, GossipEvent
from pico.gossip.seal import Keyring
from pico.gossip.transport import GossipTransport

KEY = os.urandom(32)


class Member:
    """A gossip transport on 127.0.0.1 with its gossiper and the events it reported."""

    def __init__(self, node_id: str, config: GossipConfig, keyed: bool) -> None:
        self.events: list[GossipEvent] = []
        keyring = Keyring([KEY], node_id) if keyed else None
        self.transport = GossipTransport("127.0.0.1", 0, self.events.extend, keyring=keyring)
        self.node_id = node_id
        self.config = config

    async def start(self) -> None:
        port = await self.transport.bind()
        self.port = port
        self.addr = f"127.0.0.1:{port}"
        self.transport.attach(Gossiper(self.node_id, self.addr, self.config))
        self.transport.start()

    @property
    def gossiper(self) -> Gossiper:
        return self.transport.gossiper


@pytest.fixture
async def members() -> AsyncIterator[list[Member]]:
    started: list[Member] = []
    yield started
    for member in started:
        await member.transport.close()


async def start(
    members: list[Member], node_id: str, keyed: bool = False, **config: object
) -> Member:
    member = Member(node_id, GossipConfig(interval=0.05, **config), keyed)  # type: ignore[arg-type]
    await member.start()
    members.append(member)
    return member


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "sealed"])
async def test_a_node_with_a_thousand_endpoints_is_joined_in_one_exchange(
    members: list[Member], keyed: bool
) -> None:
    seed = await start(members, "seed", keyed)
    for i in range(1000):
        seed.gossiper.upsert(f"endpoint:customer-service-{i:04d}", str(i % 7 + 1))
    joiner = await start(members, "joiner", keyed)

    started = time.monotonic()
    # Generous: only catches a join that never completes (the old reader re-parsed only
    # when its buffer doubled, so a message just over 64 KiB was never parsed).
    joined, errors = await asyncio.wait_for(joiner.transport.join([seed.addr]), 8)
    elapsed = time.monotonic() - started
    assert (joined, errors) == (["seed"], [])
    # More than one 64 KiB read: the reply the old reader never parsed.
    assert joiner.transport.counters.stream_bytes_in > 64 * 1024
    state = joiner.gossiper.node_state("seed")
    assert state is not None
    assert sum(1 for e in state.entries if e.key.startswith("endpoint:")) == 1000
    print(f"join of 1000 endpoints ({'sealed' if keyed else 'plain'}): {elapsed * 1000:.0f} ms")


async def test_a_join_message_over_the_size_limit_is_refused_unread_and_counted(
    members: list[Member],
) -> None:
    seed = await start(members, "seed", max_join_size=65536)
    reader, writer = await asyncio.open_connection("127.0.0.1", seed.port)
    try:
        writer.write((1 << 30).to_bytes(4, "big") + b"\x03\x00")  # announces 1 GiB
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # hung up, nothing buffered
    finally:
        writer.close()
    assert seed.transport.rejected() == {"join_size": 1}
    assert seed.gossiper.nodes()[0].id == "seed" and len(seed.gossiper.nodes()) == 1


async def test_a_joiner_whose_state_is_over_the_seeds_limit_gets_an_error(
    members: list[Member],
) -> None:
    seed = await start(members, "seed", max_join_size=65536)
    joiner = await start(members, "joiner")
    for i in range(1000):
        joiner.gossiper.upsert(f"endpoint:customer-service-{i:04d}", "1")
    joined, errors = await asyncio.wait_for(joiner.transport.join([seed.addr]), 8)
    assert joined == [] and len(errors) == 1
    assert seed.transport.rejected() == {"join_size": 1}
