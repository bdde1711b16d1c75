"""Gossip without keys, from an outsider on the network: state stays bounded, nothing forged
locks a member out, and no reply is reflected to a third party or amplified."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
import msgpack

from pico.server.node import Node
from tests.integration.test_cluster import cluster, gossip_addr
from tests.support.cluster import Harness, admin_url, wait_for
from tests.support.services import sample_app

MAX_NODES_DEFAULT = 1024


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def sock_addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"{host}:{port}"


def digest(sender: str, addr: str, request: bool, entries: list[dict[str, Any]]) -> bytes:
    """A digest datagram as any msgpack client can write it."""
    head = msgpack.packb({"node_id": sender, "addr": addr, "request": request})
    return b"\x01\x00" + head + b"".join(msgpack.packb(e) for e in entries)


def received(sock: socket.socket) -> list[bytes]:
    packets = []
    while True:
        try:
            packets.append(sock.recv(65536))
        except BlockingIOError:
            return packets


async def wait_received(
    sock: socket.socket, what: str, until: Callable[[list[bytes]], bool] = bool
) -> list[bytes]:
    """Datagrams received on ``sock`` once ``until`` holds for them (any, by default)."""
    got: list[bytes] = []

    def done() -> bool:
        got.extend(received(sock))
        return until(got)

    await wait_for(done, timeout=5, what=what)
    return got


async def send_all(node: Node, sock: socket.socket, packets: list[bytes]) -> None:
    """Send datagrams to the node ten at a time, each batch once the node has read the last
    (so that none is dropped by a full socket buffer)."""
    assert node.addrs is not None
    counters = node.gossip.counters
    for i in range(0, len(packets), 10):
        batch = packets[i : i + 10]
        wanted = counters.packets_in + len(batch)
        for packet in batch:
            sock.sendto(packet, node.addrs.gossip)
        await wait_for(lambda w=wanted: counters.packets_in >= w, what="batch read")  # type: ignore[misc]


async def metrics(node: Node) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(admin_url(node) + "/metrics") as resp:
            return await resp.text()


def fakes(node: Node) -> int:
    return sum(1 for m in node.gossip.gossiper.nodes() if m.id.startswith("fake-"))


async def test_a_flood_of_fake_nodes_is_bounded_never_spreads_and_is_forgotten(
    h: Harness, logs: io.StringIO
) -> None:
    a, b = await cluster(h, 2, gossip={"expiry": "2s"})
    flood = [
        digest(
            f"flooder-{i}",
            "127.0.0.1:9",
            False,
            [
                {"id": f"fake-{i}-{j}", "addr": "127.0.0.1:9", "version": 5, "left": False}
                for j in range(25)
            ],
        )
        for i in range(250)
    ]
    with udp_socket() as sock:
        await send_all(a, sock, flood)
    assert len(a.gossip.gossiper.nodes()) <= MAX_NODES_DEFAULT
    seen_on_b = [fakes(b)]

    def forgotten() -> bool:
        seen_on_b.append(fakes(b))
        return fakes(a) == 0

    # Nodes only ever named in a digest are forgotten after gossip.expiry (2 s here).
    await wait_for(forgotten, timeout=15, what="fake nodes forgotten")
    assert max(seen_on_b) == 0  # never spread to the other member
    text = await metrics(a)
    assert 'pico_gossip_rejected_total{reason="max_nodes"}' in text
    warned = [
        json.loads(line)
        for line in logs.getvalue().splitlines()
        if '"max_nodes"' in line and '"warn"' in line
    ]
    assert len(warned) == 1  # one line for the whole flood, not one per datagram
    assert {n.node_id for n in (a, b)} <= {m.id for m in a.gossip.gossiper.nodes()}


async def own_digest(node: Node, sock: socket.socket) -> dict[str, Any]:
    """Ask a node for its digest, as an outsider can; returns its own digest entry."""
    padding = [
        {"id": f"pad-{i}", "addr": "127.0.0.1:9", "version": 0, "left": False} for i in range(20)
    ]
    assert node.addrs is not None
    sock.sendto(digest("asker", sock_addr(sock), True, padding), node.addrs.gossip)
    got = await wait_received(
        sock, "digest reply", until=lambda got: any(p[:1] == b"\x01" for p in got)
    )
    packet = next(p for p in got if p[:1] == b"\x01")
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(packet[2:])
    objects = list(unpacker)
    entry: dict[str, Any] = objects[1]
    assert entry["id"] == node.node_id
    return entry


async def test_a_forged_huge_version_cannot_lock_a_member_out(h: Harness) -> None:
    a, b = await cluster(h, 2)
    with udp_socket() as sock:
        entry = await own_digest(a, sock)
        header: dict[str, Any] = {"node_id": a.node_id, "addr": gossip_addr(a), "entries": 1}
        if "incarnation" in entry:
            header["incarnation"] = entry["incarnation"]
        forged = (
            b"\x02\x00"
            + msgpack.packb({"node_id": "intruder", "addr": "127.0.0.1:9"})
            + msgpack.packb(header)
            + msgpack.packb(
                {
                    "key": "endpoint:forged",
                    "value": "1",
                    "version": 2**64 - 1,
                    "internal": False,
                    "deleted": False,
                }
            )
        )
        await send_all(b, sock, [forged])
    # a's real changes still reach b.
    port = await h.service(sample_app())
    await h.agent(a, [f"ep/127.0.0.1:{port}"])
    await wait_for(
        lambda: b.cluster.remotes[a.node_id].endpoints.get("ep") == 1,
        timeout=10,
        what="a's endpoint reaches b",
    )
    assert "forged" not in b.cluster.remotes[a.node_id].endpoints
    assert 'pico_gossip_rejected_total{reason="version_step"}' in await metrics(b)


async def test_replies_go_to_the_datagram_source_never_to_the_address_inside(
    h: Harness,
) -> None:
    a = await h.node()
    assert a.addrs is not None
    with udp_socket() as sender, udp_socket() as victim:
        request = digest(
            "stranger",
            sock_addr(victim),
            True,
            [{"id": "stranger", "addr": sock_addr(victim), "version": 0, "left": False}],
        )
        sender.sendto(request, a.addrs.gossip)
        await wait_received(sender, "a reply at the source address")
        assert received(victim) == []


async def test_a_reply_to_an_outsider_is_at_most_four_times_its_request(h: Harness) -> None:
    a = await h.node()
    for i in range(300):
        a.gossip.gossiper.upsert(f"endpoint:service-{i:03d}", "1")
    assert a.addrs is not None
    with udp_socket() as attacker, udp_socket() as probe:
        # Everything a has about itself, please, sent to the address inside (the attacker's
        # own here, so that the old behaviour is measured too).
        request = digest(
            "stranger",
            sock_addr(attacker),
            True,
            [{"id": a.node_id, "addr": gossip_addr(a), "version": 0, "left": False}],
        )
        attacker.sendto(request, a.addrs.gossip)
        # a answers datagrams in order: once the probe has its answer, the request has all of
        # its answers.
        probe.sendto(digest("probe", sock_addr(probe), False, []), a.addrs.gossip)
        await wait_received(probe, "probe answered")
        replies = received(attacker)
    total = sum(len(p) for p in replies)
    assert total <= 4 * len(request), f"x{total / len(request):.0f} ({len(replies)} packets)"
