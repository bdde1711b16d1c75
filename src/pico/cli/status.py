"""`pico status ...`: inspect a node or the cluster through the admin API."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click
import yaml

from pico.status.client import StatusClient, StatusError

F = TypeVar("F", bound=Callable[..., Any])


def _common(f: F) -> F:
    f = click.option(
        "--token",
        envvar="PICO_TOKEN",
        default="",
        metavar="TOKEN",
        help="Bearer token for an admin port with auth (or PICO_TOKEN).",
    )(f)
    f = click.option(
        "-o",
        "--output",
        type=click.Choice(["yaml", "json"]),
        default="yaml",
        show_default=True,
        help="Output format.",
    )(f)
    f = click.option(
        "--forward", default="", metavar="NODE_ID", help="Ask this node (through --server.url)."
    )(f)
    f = click.option(
        "--server.url",
        "server_url",
        default="http://localhost:8002",
        show_default=True,
        help="Admin URL of any node (or the load balancer).",
    )(f)
    return f


def _emit(data: Any, output: str) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), nl=False)


def _run(what: str, fetch: Callable[[], Any], output: str) -> None:
    try:
        data = fetch()
    except StatusError as exc:
        click.echo(f"failed to get {what}: {exc}")
        raise SystemExit(1) from None
    _emit(data, output)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def status() -> None:
    """Inspect the cluster through a node's admin API."""


@status.group()
def cluster() -> None:
    """Cluster membership and routing state."""


@cluster.command("nodes")
@_common
def cluster_nodes(server_url: str, forward: str, output: str, token: str) -> None:
    """List the nodes of the cluster."""
    client = StatusClient(server_url, forward, token)
    _run("cluster nodes", lambda: {"nodes": client.cluster_nodes()}, output)


@cluster.command("node")
@click.argument("node_id")
@_common
def cluster_node(node_id: str, server_url: str, forward: str, output: str, token: str) -> None:
    """Show one node (NODE_ID, or 'local' for the node answering)."""
    client = StatusClient(server_url, forward, token)
    _run("cluster node", lambda: client.cluster_node(node_id), output)


@status.group()
def proxy() -> None:
    """The node's proxy state."""


@proxy.command("endpoints")
@_common
def proxy_endpoints(server_url: str, forward: str, output: str, token: str) -> None:
    """List the endpoints with upstreams on the node, and the upstreams' addresses."""
    client = StatusClient(server_url, forward, token)
    _run("endpoints", lambda: {"endpoints": client.proxy_endpoints()}, output)


@status.group()
def gossip() -> None:
    """The node's gossip state."""


@gossip.command("nodes")
@_common
def gossip_nodes(server_url: str, forward: str, output: str, token: str) -> None:
    """List the nodes gossip knows about."""
    client = StatusClient(server_url, forward, token)
    _run("gossip nodes", lambda: {"nodes": client.gossip_nodes()}, output)


@gossip.command("node")
@click.argument("node_id")
@_common
def gossip_node(node_id: str, server_url: str, forward: str, output: str, token: str) -> None:
    """Show one node's gossip state and entries."""
    client = StatusClient(server_url, forward, token)
    _run("gossip node", lambda: client.gossip_node(node_id), output)
