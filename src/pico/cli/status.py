"""`pico status ...`: inspect a node or the cluster through the admin API."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click
import yaml

from pico.status.client import StatusClient, StatusError
from pico.tls import client_context

F = TypeVar("F", bound=Callable[..., Any])


def _common(f: F) -> F:
    f = click.option(
        "--server.tls.insecure-skip-verify",
        "insecure_skip_verify",
        is_flag=True,
        help="Do not verify the admin port's certificate (testing only).",
    )(f)
    f = click.option(
        "--server.tls.key", "key", default="", metavar="PATH", help="Key of --server.tls.cert."
    )(f)
    f = click.option(
        "--server.tls.cert",
        "cert",
        default="",
        metavar="PATH",
        help="Client certificate (PEM) for an admin port that requires mTLS.",
    )(f)
    f = click.option(
        "--server.tls.root-ca",
        "root_ca",
        default="",
        metavar="PATH",
        help="CA certificates (PEM) to verify an https admin port with (default: system roots).",
    )(f)
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


def _client(
    server_url: str,
    forward: str,
    token: str,
    root_ca: str,
    cert: str,
    key: str,
    insecure_skip_verify: bool,
) -> StatusClient:
    tls = None
    if server_url.startswith("https:"):
        try:
            tls = client_context(root_ca, cert, key, insecure_skip_verify=insecure_skip_verify)
        except (OSError, ValueError) as exc:
            click.echo(f"--server.tls: cannot load the certificates: {exc}", err=True)
            raise SystemExit(1) from None
    return StatusClient(server_url, forward, token, tls)


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
def cluster_nodes(output: str, **connect: Any) -> None:
    """List the nodes of the cluster."""
    client = _client(**connect)
    _run("cluster nodes", lambda: {"nodes": client.cluster_nodes()}, output)


@cluster.command("node")
@click.argument("node_id")
@_common
def cluster_node(node_id: str, output: str, **connect: Any) -> None:
    """Show one node (NODE_ID, or 'local' for the node answering)."""
    client = _client(**connect)
    _run("cluster node", lambda: client.cluster_node(node_id), output)


@status.group()
def proxy() -> None:
    """The node's proxy state."""


@proxy.command("endpoints")
@_common
def proxy_endpoints(output: str, **connect: Any) -> None:
    """List the endpoints with upstreams on the node, and the upstreams' addresses."""
    client = _client(**connect)
    _run("endpoints", lambda: {"endpoints": client.proxy_endpoints()}, output)


@proxy.command("protocols")
@_common
def proxy_protocols(output: str, **connect: Any) -> None:
    """List how the node serves each of its endpoints: http or tcp."""
    client = _client(**connect)
    _run("protocols", lambda: {"protocols": client.proxy_protocols()}, output)


@status.group()
def gossip() -> None:
    """The node's gossip state."""


@gossip.command("nodes")
@_common
def gossip_nodes(output: str, **connect: Any) -> None:
    """List the nodes gossip knows about."""
    client = _client(**connect)
    _run("gossip nodes", lambda: {"nodes": client.gossip_nodes()}, output)


@gossip.command("node")
@click.argument("node_id")
@_common
def gossip_node(node_id: str, output: str, **connect: Any) -> None:
    """Show one node's gossip state and entries."""
    client = _client(**connect)
    _run("gossip node", lambda: client.gossip_node(node_id), output)
