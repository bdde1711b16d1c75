"""In-process nodes, agents and services for integration tests (all on 127.0.0.1, port 0)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pico.agent.agent import Agent
from pico.config import AgentConfig, ServerConfig, load_config_dict
from pico.mux.tunnel import Tunnel
from pico.server.node import Node
from tests.support.services import RawConnection, sample_app


def server_config(**sections: Any) -> ServerConfig:
    """A node config with every port on 127.0.0.1:0, overridable per section."""
    data: dict[str, Any] = {
        "proxy": {"bind_addr": "127.0.0.1:0"},
        "upstream": {"bind_addr": "127.0.0.1:0"},
        "admin": {"bind_addr": "127.0.0.1:0"},
        "gossip": {"bind_addr": "127.0.0.1:0", "interval": "50ms"},
        "server": {"graceful_shutdown_timeout": "5s"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return load_config_dict(ServerConfig, data)


def agent_config(node: Node, endpoints: list[str], **sections: Any) -> AgentConfig:
    """An agent config pointing at `node`'s upstream port."""
    assert node.addrs is not None
    host, port = node.addrs.upstream
    data: dict[str, Any] = {
        "endpoints": endpoints,
        "server": {"url": f"http://{host}:{port}", "heartbeat_interval": "1s"},
        "admin": {"bind_addr": "127.0.0.1:0"},
        "forwarder": {"timeout": "2s"},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return load_config_dict(AgentConfig, data)


@dataclass
class RunningAgent:
    agent: Agent
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 15)


async def start_agent(config: AgentConfig) -> RunningAgent:
    """Run an agent in the background (its admin port is not started)."""
    agent = Agent(config)
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(agent.run(stop))
    return RunningAgent(agent, stop, task)


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = ""
) -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what or predicate}")
        await asyncio.sleep(0.01)


def proxy_url(node: Node) -> str:
    assert node.addrs is not None
    host, port = node.addrs.proxy
    return f"http://{host}:{port}"


def admin_url(node: Node) -> str:
    assert node.addrs is not None
    host, port = node.addrs.admin
    return f"http://{host}:{port}"


class Harness:
    """Owns everything a test starts; `close()` stops it all."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.agents: list[RunningAgent] = []
        self.runners: list[web.AppRunner] = []
        self.closers: list[Callable[[], None]] = []  # anything else a test started

    async def node(self, **sections: Any) -> Node:
        node = Node(server_config(**sections))
        await node.start()
        self.nodes.append(node)
        return node

    async def agent(self, node: Node, endpoints: list[str], **sections: Any) -> RunningAgent:
        running = await start_agent(agent_config(node, endpoints, **sections))
        self.agents.append(running)
        return running

    async def tcp_agent(self, node: Node, endpoint: str, port: int) -> RunningAgent:
        """An agent registering `endpoint` as TCP, for a service on 127.0.0.1:`port`."""
        running = await start_agent(tcp_agent_config(node, endpoint, f"127.0.0.1:{port}"))
        self.agents.append(running)
        return running

    async def service(self, app: web.Application) -> int:
        """Serve an aiohttp app on 127.0.0.1; returns its port."""
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        server = site._server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def with_service(self, **sections: Any) -> tuple[Node, RunningAgent, web.Application]:
        """A node with the sample service registered as endpoint `ep` through an agent."""
        node = await self.node(**sections)
        app = sample_app()
        port = await self.service(app)
        running = await self.agent(node, [f"ep/127.0.0.1:{port}"])
        await self.tunnel_up(node, "ep")
        return node, running, app

    async def tunnel_up(self, node: Node, endpoint: str, count: int = 1) -> None:
        await wait_for(
            lambda: node.registry.counts().get(endpoint, 0) >= count,
            what=f"{count} upstream(s) for {endpoint}",
        )

    async def close(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(Exception):
                await agent.close()
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.shutdown()
        for runner in self.runners:
            await runner.cleanup()
        for close in self.closers:
            close()


async def agent_tunnel(running: RunningAgent) -> Tunnel:
    """The agent's tunnel of its first endpoint, once the agent has it (the node registers a
    tunnel as it sends the 101, a moment before the agent has read it)."""
    link = running.agent.links[0]
    await wait_for(lambda: link.tunnel is not None, what="the agent's side of its tunnel")
    assert link.tunnel is not None
    return link.tunnel


async def connect(node: Node) -> RawConnection:
    """A raw client connection to the node's proxy port."""
    assert node.addrs is not None
    return await RawConnection.open(*node.addrs.proxy)


def tcp_agent_config(node: Node, endpoint: str, addr: str, **listener: Any) -> AgentConfig:
    """An agent config registering `endpoint` as a TCP listener for `addr`."""
    assert node.addrs is not None
    host, port = node.addrs.upstream
    data: dict[str, Any] = {
        "listeners": [{"endpoint_id": endpoint, "addr": addr, "protocol": "tcp", **listener}],
        "server": {"url": f"http://{host}:{port}", "heartbeat_interval": "1s"},
        "admin": {"bind_addr": "127.0.0.1:0"},
        "forwarder": {"timeout": "2s"},
    }
    return load_config_dict(AgentConfig, data)
