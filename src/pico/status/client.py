"""A small client for the admin API, used by `pico status`."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

# The CLI must not hang on an unresponsive node.
_TIMEOUT = 15.0


class StatusError(Exception):
    """The admin API could not be reached or answered with an error."""


class StatusClient:
    """GETs JSON from a node's admin API (optionally forwarded to another node)."""

    def __init__(
        self, url: str, forward: str = "", token: str = "", tls: ssl.SSLContext | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.tls = tls
        self.forward = forward
        self.token = token

    def get(self, path: str) -> Any:
        """GET `path` and decode its JSON body. Raises StatusError."""
        url = self.url + path
        if self.forward:
            url += "?" + urllib.parse.urlencode({"forward": self.forward})
        request = urllib.request.Request(url)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT, context=self.tls) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = ""
            try:
                detail = json.loads(exc.read()).get("error", "")
            except (ValueError, AttributeError):
                pass
            raise StatusError(
                f"request: bad status: {exc.code}" + (f" ({detail})" if detail else "")
            ) from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StatusError(f"request: {url}: {reason}") from exc

    def cluster_nodes(self) -> list[dict[str, Any]]:
        """`/status/cluster/nodes`, sorted by id."""
        nodes: list[dict[str, Any]] = self.get("/status/cluster/nodes")
        return sorted(nodes, key=lambda n: str(n.get("id", "")))

    def cluster_node(self, node_id: str) -> dict[str, Any]:
        """`/status/cluster/nodes/{id}`."""
        node: dict[str, Any] = self.get("/status/cluster/nodes/" + urllib.parse.quote(node_id))
        return node

    def proxy_endpoints(self) -> dict[str, list[str]]:
        """`/status/proxy/endpoints`."""
        endpoints: dict[str, list[str]] = self.get("/status/proxy/endpoints")
        return endpoints

    def proxy_protocols(self) -> dict[str, str]:
        """`/status/proxy/protocols`: endpoint id -> "http" or "tcp"."""
        protocols: dict[str, str] = self.get("/status/proxy/protocols")
        return protocols

    def gossip_nodes(self) -> list[dict[str, Any]]:
        """`/status/gossip/nodes`."""
        nodes: list[dict[str, Any]] = self.get("/status/gossip/nodes")
        return nodes

    def gossip_node(self, node_id: str) -> dict[str, Any]:
        """`/status/gossip/nodes/{id}`."""
        node: dict[str, Any] = self.get("/status/gossip/nodes/" + urllib.parse.quote(node_id))
        return node
