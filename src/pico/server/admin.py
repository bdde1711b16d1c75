"""The admin port: the dashboard, health, readiness, Prometheus metrics and the status API.

Every route honours `?forward=NODE_ID`: the request is proxied to that node's admin address
(404 for an unknown id), so `pico status ... --forward ID` works through a load balancer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pico import log
from pico.auth import AuthFailure, TokenVerifier
from pico.server.cluster import ClusterState
from pico.server.dashboard import serve_dashboard
from pico.server.history import History
from pico.server.metrics import NodeMetrics
from pico.server.upstream import EndpointRegistry
from pico.tls import PeerTls, client_context

_log = log.get_logger("admin")

# A forwarded admin request must not hang: shorter than the CLI's own 15 s, so the CLI
# gets our 504 rather than its own timeout.
_FORWARD_TIMEOUT = 10.0
# Bounds what a forwarded answer can make this node hold in memory.
_MAX_FORWARD_BODY = 32 << 20
_HOP_HEADER = "x-pico-admin-forwarded"
# Probes stay open whatever the auth config: orchestrators do not carry tokens. So does the
# dashboard page: it is static and holds no data (its data routes need the token, which the
# page takes from `/#token=...`).
_OPEN_ROUTES = frozenset({"/health", "/ready", "/"})
_CHALLENGE = {"WWW-Authenticate": "Bearer"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminServer:
    """Routes of the admin port of one node."""

    def __init__(
        self,
        cluster: ClusterState,
        registry: EndpointRegistry,
        metrics: NodeMetrics,
        gossip_status: Callable[[str | None], object] | None = None,
        auth: TokenVerifier | None = None,
        peer_tls: PeerTls | None = None,
        history: History | None = None,
    ) -> None:
        self.history = history or History()
        self.cluster = cluster
        # How `?forward=` reaches a node whose admin port speaks TLS.
        self.peer_tls = peer_tls or PeerTls(client_context())
        # With `auth`, every route but the probes (/health, /ready) needs a bearer token.
        self.auth = auth
        self.registry = registry
        self.metrics = metrics
        self.gossip_status = gossip_status
        self.ready = False
        self._client: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(middlewares=[self._auth_middleware, self._forward_middleware])
        r = app.router
        r.add_get("/", serve_dashboard)
        r.add_get("/health", self.health)
        r.add_get("/ready", self.ready_handler)
        r.add_get("/metrics", self.metrics_handler)
        r.add_get("/status/cluster/nodes", self.cluster_nodes)
        r.add_get("/status/cluster/nodes/{id}", self.cluster_node)
        r.add_get("/status/proxy/endpoints", self.proxy_endpoints)
        r.add_get("/status/proxy/protocols", self.proxy_protocols)
        r.add_get("/status/proxy/stats", self.proxy_stats)
        r.add_get("/status/gossip/nodes", self.gossip_nodes)
        r.add_get("/status/gossip/nodes/{id}", self.gossip_node)
        r.add_get("/status/history", self.history_handler)
        app.on_cleanup.append(self._close_client)
        return app

    async def _close_client(self, app: web.Application) -> None:
        if self._client is not None:
            await self._client.close()

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.auth is None or request.path in _OPEN_ROUTES:
            return await handler(request)
        try:
            self.auth.check(request.headers.get("Authorization"))
        except AuthFailure as exc:
            return web.json_response({"error": exc.message}, status=exc.status, headers=_CHALLENGE)
        return await handler(request)

    @web.middleware
    async def _forward_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        target = request.query.get("forward")
        if not target or target in (self.cluster.local.id, "local"):
            return await handler(request)
        if request.headers.get(_HOP_HEADER):
            # Forwarded once already and still not at its target: the target's advertised
            # admin address leads elsewhere (a load balancer?). Stop instead of looping.
            message = f"node {target!r} is not reachable at its advertised admin address"
            return web.json_response({"error": message}, status=508)
        if request.method != "GET":
            return web.json_response({"error": "only GET is forwarded"}, status=405)
        node = self.cluster.node(target)
        if node is None:
            return web.json_response({"error": f"unknown node {target!r}"}, status=404)
        if self._client is None:
            self._client = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=_FORWARD_TIMEOUT)
            )
        secure = "admin" in node.tls
        url = f"{'https' if secure else 'http'}://{node.admin_addr}{request.rel_url}"
        tls: dict[str, Any] = {}
        if secure:
            host = node.admin_addr.rpartition(":")[0].strip("[]")
            tls = {"ssl": self.peer_tls.context, "server_hostname": self.peer_tls.hostname(host)}
        headers = {_HOP_HEADER: "1"}
        token = request.headers.get("Authorization")
        if token is not None:
            headers["Authorization"] = token  # the target checks the caller's token too
        try:
            async with self._client.get(url, allow_redirects=False, headers=headers, **tls) as resp:
                body = await resp.content.read(_MAX_FORWARD_BODY + 1)
                if len(body) > _MAX_FORWARD_BODY:
                    return web.json_response({"error": "response too large"}, status=502)
                headers = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type",)}
                return web.Response(status=resp.status, body=body, headers=headers)
        except TimeoutError:
            return web.json_response({"error": "upstream timeout"}, status=504)
        except aiohttp.ClientError as exc:
            _log.warn("admin forward failed", node_id=target, error=str(exc))
            return web.json_response({"error": "upstream unreachable"}, status=502)

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    async def ready_handler(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200 if self.ready else 503)

    async def metrics_handler(self, request: web.Request) -> web.StreamResponse:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def cluster_nodes(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([n.metadata() for n in self.cluster.nodes()])

    async def cluster_node(self, request: web.Request) -> web.StreamResponse:
        node = self.cluster.node(request.match_info["id"])
        if node is None:
            return web.json_response({"error": "node not found"}, status=404)
        return web.json_response(node.detail())

    async def proxy_endpoints(self, request: web.Request) -> web.StreamResponse:
        endpoints = {
            endpoint_id: [u.addr for u in ups]
            for endpoint_id, ups in sorted(self.registry.endpoints().items())
        }
        return web.json_response(endpoints)

    async def proxy_protocols(self, request: web.Request) -> web.StreamResponse:
        """How each endpoint with upstreams here is served: "http" or "tcp" (a route of its
        own: /status/proxy/endpoints keeps its shape)."""
        protocols = {
            endpoint_id: ups[0].protocol
            for endpoint_id, ups in sorted(self.registry.endpoints().items())
            if ups
        }
        return web.json_response(protocols)

    async def history_handler(self, request: web.Request) -> web.StreamResponse:
        """The last 15 minutes of this node's client traffic (see pico.server.history)."""
        return web.json_response(self.history.snapshot())

    async def proxy_stats(self, request: web.Request) -> web.StreamResponse:
        """Per endpoint on this node: its local upstreams and request counts since start."""
        stats = self.metrics.proxy
        endpoints = self.registry.endpoints()
        names = sorted(set(endpoints) | set(stats.by_endpoint))
        return web.json_response(
            {
                "node_id": self.cluster.local.id,
                "endpoints": {
                    name: {
                        "upstreams": [u.addr for u in endpoints.get(name, [])],
                        "requests": stats.by_endpoint.get(name, [0, 0])[0],
                        "errors": stats.by_endpoint.get(name, [0, 0])[1],
                    }
                    for name in names
                },
            }
        )

    async def gossip_nodes(self, request: web.Request) -> web.StreamResponse:
        if self.gossip_status is None:
            return web.json_response([])
        return web.json_response(self.gossip_status(None))

    async def gossip_node(self, request: web.Request) -> web.StreamResponse:
        if self.gossip_status is None:
            return web.json_response({"error": "node not found"}, status=404)
        state = self.gossip_status(request.match_info["id"])
        if state is None:
            return web.json_response({"error": "node not found"}, status=404)
        return web.json_response(state)
