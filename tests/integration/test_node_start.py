"""The start-up order: keys, then the cluster, then agents and clients (see Node.start)."""

from __future__ import annotations

import asyncio

import pytest

from pico.server.node import Node
from tests.integration.test_cluster import gossip_addr
from tests.support.cluster import Harness, proxy_url, server_config
from tests.support.procs import http_get


async def test_a_node_joins_the_cluster_before_it_accepts_agents_or_clients(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _, _ = await h.with_service()
    seen: list[tuple[bool, bool, bool]] = []
    join_once = Node._join_once

    async def observed(node: Node) -> bool:
        assert node._proxy_server is not None and node.upstream_server._server is not None
        seen.append(
            (
                node._proxy_server.is_serving(),
                node.upstream_server._server.is_serving(),
                node.admin.ready,
            )
        )
        return await join_once(node)

    monkeypatch.setattr(Node, "_join_once", observed)
    second = Node(server_config(cluster={"join": [gossip_addr(first)]}))
    h.nodes.append(second)
    await second.start()
    assert seen == [(False, False, False)]
    assert second._proxy_server is not None and second._proxy_server.is_serving()
    assert second.admin.ready
    # The join delivered the cluster's endpoints with it: the very first request is routed.
    status, body = await asyncio.to_thread(
        http_get, proxy_url(second) + "/", {"x-pico-endpoint": "ep"}
    )
    assert (status, body) == (200, b"hello")
