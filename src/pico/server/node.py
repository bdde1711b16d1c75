"""One Pico node: composes the ports and spells out start-up and shutdown order.

Start: token keys → admin (with /ready = 503) → bind upstream and proxy (not accepting yet) →
publish our addresses and join the cluster → accept agents → accept clients → ready. A join
that keeps failing is retried in the background and, with `cluster.abort_if_join_fails`, stops
the node with an error.
Stop: /ready = 503 → stop accepting proxy clients → GoAway on every tunnel so agents move
elsewhere → leave the cluster (peers see `left` at once) → let in-flight requests finish
(bounded by `server.graceful_shutdown_timeout`) → close tunnels, gossip, admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
import ssl
from dataclasses import dataclass

import psutil
from aiohttp import web

from pico import log, native
from pico.auth import ProxyAuth, verifier_for
from pico.config import ServerConfig, parse_host_port
from pico.gossip import GossipConfig, Gossiper, GossipEvent
from pico.gossip.seal import Keyring, parse_key
from pico.gossip.transport import GossipTransport
from pico.http.proxy import ProxyConnection
from pico.http.settings import (
    AddressLimit,
    ConnectionTracker,
    Observer,
    ProxyLimits,
    RequestRecord,
)
from pico.server import collectors
from pico.server.access_log import AccessLog
from pico.server.admin import AdminServer
from pico.server.cluster import ClusterState, NodeInfo
from pico.server.forward import MemberProof, NodeUpstreams, bindable_source
from pico.server.history import History
from pico.server.metrics import NodeMetrics
from pico.server.proxy import NodeRouter
from pico.server.syncer import ClusterSyncer
from pico.server.upstream import EndpointRegistry, TunnelLimits, UpstreamServer
from pico.tls import PeerTls, client_context, server_context
from pico.webapp import BindError, ConnectionGuard, ConnectionLimits, serve_app

_log = log.get_logger("server")

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz1234567890"


class StartupError(Exception):
    """The node could not start (a port in use, an address that cannot be bound)."""


def generate_node_id(prefix: str = "") -> str:
    """`prefix` + 7 random characters from [a-z0-9]."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(7))


def advertise_host(bound_host: str) -> str:
    """The address peers should use for a socket bound to `bound_host`.

    A wildcard bind advertises a private (RFC 1918) address of the host, else its first
    non-loopback address, else 127.0.0.1, so a bare `pico server` starts on any machine.
    """
    if bound_host not in ("", "0.0.0.0", "::"):
        return bound_host
    candidates: list[ipaddress.IPv4Address] = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET:
                with contextlib.suppress(ValueError):
                    candidates.append(ipaddress.IPv4Address(addr.address))
    for ip in candidates:
        if ip.is_private and not ip.is_loopback and not ip.is_link_local:
            return str(ip)
    for ip in candidates:
        if not ip.is_loopback:
            return str(ip)
    return "127.0.0.1"


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class BoundAddrs:
    """Where the node listens, and what it advertises."""

    proxy: tuple[str, int]
    upstream: tuple[str, int]
    admin: tuple[str, int]
    gossip: tuple[str, int]
    proxy_advertise: str
    upstream_advertise: str
    admin_advertise: str
    gossip_advertise: str


class Node:
    """A Pico server node."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        cluster_cfg = config.cluster
        self.node_id = cluster_cfg.node_id or generate_node_id(cluster_cfg.node_id_prefix)
        self.metrics = NodeMetrics()
        self.history = History()
        self.registry = EndpointRegistry()
        # Server TLS context of each port that has a certificate; how we reach other nodes'.
        self.tls = {
            port: server_context(tls.cert, tls.key, tls.client_cas)
            for port, tls in (
                ("proxy", config.proxy.tls),
                ("upstream", config.upstream.tls),
                ("admin", config.admin.tls),
            )
            if tls.enabled
        }
        peer = config.cluster.tls
        self.peer_tls = PeerTls(client_context(peer.root_ca, peer.cert, peer.key), peer.server_name)
        self.cluster = ClusterState(
            NodeInfo(
                id=self.node_id,
                proxy_addr="",
                admin_addr="",
                tls=frozenset(self.tls) & {"proxy", "admin"},
            )
        )
        self.node_upstreams = NodeUpstreams(self.cluster.remotes.get, self.peer_tls)
        self.router = NodeRouter(self.registry, self.cluster, self.node_upstreams.get)
        # One token verifier per port with auth on; their JWKS refreshers run while the
        # node does (`_key_tasks`).
        self.verifiers = {
            port: verifier
            for port, auth_config in (
                ("proxy", config.proxy.auth),
                ("upstream", config.upstream.auth),
                ("admin", config.admin.auth),
            )
            if (verifier := verifier_for(auth_config, self.metrics.auth_failure_counter(port)))
        }
        self._key_tasks: set[asyncio.Task[None]] = set()
        up = config.upstream
        self.upstream_server = UpstreamServer(
            self.registry,
            auth=self.verifiers.get("upstream"),
            disconnect_on_expiry=not up.auth.disable_disconnect_on_expiry,
            ping_interval=up.heartbeat_interval,
            ping_timeout=up.heartbeat_timeout,
            limits=TunnelLimits(
                max_tunnels=up.max_tunnels,
                max_tunnels_per_endpoint=up.max_tunnels_per_endpoint,
                max_streams_per_tunnel=up.max_streams_per_tunnel,
                max_connections_per_ip=up.max_connections_per_ip,
                max_control_frames=up.max_control_frames,
                stream_ack_timeout=config.proxy.stream_ack_timeout,
            ),
            on_limit=self.metrics.limit_rejected,
            tcp_observer=self.metrics,
        )
        self.admin = AdminServer(
            self.cluster,
            self.registry,
            self.metrics,
            self._gossip_status,
            auth=self.verifiers.get("admin"),
            peer_tls=self.peer_tls,
            history=self.history,
        )
        keys = [parse_key(k) for k in config.gossip.secret_keys]
        self.keyring = Keyring(keys, self.node_id) if keys else None
        self.gossip = GossipTransport("", 0, self._on_gossip_events, keyring=self.keyring)
        self.syncer: ClusterSyncer | None = None
        # Set when the node must stop on its own (the cluster join failed for good).
        self.fatal: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._join_task: asyncio.Task[None] | None = None
        self._join_errors: list[str] = []
        self.limits = ProxyLimits(
            max_header_bytes=config.proxy.max_header_bytes,
            read_header_timeout=config.proxy.read_header_timeout,
            idle_timeout=config.proxy.idle_timeout,
            response_timeout=config.proxy.timeout,
            upstream_wait=config.proxy.upstream_wait,
            trusted_proxies=tuple(
                ipaddress.ip_network(c, strict=False) for c in config.proxy.trusted_proxies
            ),
        )
        self.connections = ConnectionTracker(
            AddressLimit(config.proxy.max_connections_per_ip),
            # Load balancers and other nodes carry many clients' connections.
            exempt=lambda ip: self.limits.trusts(ip) or self._is_peer(ip),
            on_refused=self._proxy_ip_limited,
        )
        self.admin_guard = ConnectionGuard(
            ConnectionLimits(
                read_header_timeout=config.admin.read_header_timeout,
                idle_timeout=config.admin.idle_timeout,
                max_connections=config.admin.max_connections,
            )
        )
        self.addrs: BoundAddrs | None = None
        self._proxy_server: asyncio.Server | None = None
        self._admin_runner: web.AppRunner | None = None
        self._stopped = asyncio.Event()
        self.registry.listeners.append(self._on_endpoint_change)
        self.upstream_server.on_connect = lambda _: self.metrics.upstream_connects.inc()
        self.upstream_server.on_disconnect = self._on_tunnel_closed
        collectors.register(self)

    def _is_peer(self, ip: str) -> bool:
        """True if `ip` is the address of another node of the cluster."""
        for node in self.cluster.remotes.values():
            host = node.proxy_addr.rpartition(":")[0].strip("[]")
            if host == ip:
                return True
        return False

    def _proxy_ip_limited(self, ip: str) -> None:
        self.metrics.limit_rejected("proxy.max_connections_per_ip")
        _log.warn_throttled(
            "proxy limit reached: proxy.max_connections_per_ip",
            client_ip=ip,
            limit=self.config.proxy.max_connections_per_ip,
        )

    def _on_node_gone(self, node_id: str) -> None:
        self.node_upstreams.forget(node_id)
        self.metrics.proxy.forget_node(node_id)

    def _on_gossip_events(self, events: list[GossipEvent]) -> None:
        if self.syncer is not None:
            self.syncer.apply(events)

    def _gossip_status(self, node_id: str | None) -> object:
        g = self.gossip.gossiper
        now = asyncio.get_running_loop().time()
        if node_id is None:
            return [_gossip_meta(m, now) for m in sorted(g.nodes(), key=lambda m: m.id)]
        state = g.node_state(self.node_id if node_id == "local" else node_id)
        if state is None:
            return None
        return {
            **_gossip_meta(state, now),
            "entries": [
                {
                    "key": e.key,
                    "value": e.value,
                    "version": e.version,
                    "internal": e.internal,
                    "deleted": e.deleted,
                }
                for e in sorted(state.entries, key=lambda e: e.version)
            ],
        }

    def _on_remote_endpoint(self, endpoint_id: str, available: bool) -> None:
        if available:
            self.router.endpoint_available(endpoint_id)
        else:
            self.router.endpoint_lost(endpoint_id)

    def _on_tunnel_closed(self, endpoint_id: str, graceful: bool) -> None:
        self.metrics.upstream_disconnects.inc()
        if not graceful:
            # Not a goodbye: the agent is likely reconnecting (maybe to another node), so
            # requests for the endpoint may wait for it briefly.
            self.router.endpoint_lost(endpoint_id)

    def _on_endpoint_change(self, endpoint_id: str, count: int) -> None:
        if count > self.cluster.local.endpoints.get(endpoint_id, 0):
            self.router.endpoint_available(endpoint_id)
        self.cluster.set_local_endpoint(endpoint_id, count)
        if self.syncer is not None:
            self.syncer.local_endpoint_changed(endpoint_id, count)
            # Peers learn about a new or lost upstream at once, not at the next round:
            # requests for a just-registered endpoint then work from any node.
            self.gossip.push_soon()
        counts = self.registry.counts()
        self.metrics.registered_endpoints.set(len(counts))
        self.metrics.connected_upstreams.set(sum(counts.values()))

    # -- start -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every port and become ready. Raises StartupError with one clear line.

        Every part was built in `__init__` from its config (keys, TLS contexts, limits); the
        order here is what makes a starting node safe to reach at any moment.
        """
        cfg = self.config
        loop = asyncio.get_running_loop()
        # 1. Token keys first: an https JWKS is fetched (bounded by its timeout) before any
        #    port accepts, so the first agents are not refused for a key we have not read.
        await asyncio.gather(*(v.load_keys() for v in self.verifiers.values()))
        for verifier in self.verifiers.values():
            task = loop.create_task(verifier.keep_keys_fresh())
            self._key_tasks.add(task)
        try:
            # 2. The admin port serves at once: /health answers and /ready says 503 while
            #    the node joins, so an orchestrator sees it starting, not dead.
            admin_runner, admin_addr = await self._start_app(
                self.admin.app(), cfg.admin.bind_addr, "admin.bind_addr", self.tls.get("admin")
            )
            self._admin_runner = admin_runner
            # 3. Bind the upstream and proxy ports without accepting: their addresses are
            #    known (to announce) and a port in use fails the start before we announce.
            up_addr = await self._start_upstream(cfg.upstream.bind_addr)
            proxy_addr = await self._start_proxy(cfg.proxy.bind_addr)
            gossip_addr = await self._bind_gossip(cfg.gossip.bind_addr)
        except StartupError:
            await self._cleanup()
            raise
        self.addrs = BoundAddrs(
            proxy=proxy_addr,
            upstream=up_addr,
            admin=admin_addr,
            proxy_advertise=cfg.proxy.advertise_addr or self._advertise(proxy_addr),
            upstream_advertise=cfg.upstream.advertise_addr or self._advertise(up_addr),
            admin_advertise=cfg.admin.advertise_addr or self._advertise(admin_addr),
            gossip=gossip_addr,
            gossip_advertise=cfg.gossip.advertise_addr or self._advertise(gossip_addr),
        )
        self.cluster.local.proxy_addr = self.addrs.proxy_advertise
        self.cluster.local.admin_addr = self.addrs.admin_advertise
        # Forwarded requests leave from the advertised address, which the others trust.
        advertised_host = self.addrs.proxy_advertise.rpartition(":")[0].strip("[]")
        self.node_upstreams.source = bindable_source(advertised_host)
        gossiper = Gossiper(
            self.node_id,
            self.addrs.gossip_advertise,
            GossipConfig(
                interval=cfg.gossip.interval,
                # Room for the seal, so that a sealed packet still fits the configured size.
                max_packet_size=cfg.gossip.max_packet_size
                - (self.keyring.overhead if self.keyring is not None else 0),
                expiry=cfg.gossip.expiry,
                max_nodes=cfg.gossip.max_nodes,
                max_entries_per_node=cfg.gossip.max_entries_per_node,
                max_key_size=cfg.gossip.max_key_size,
                max_value_size=cfg.gossip.max_value_size,
                max_version_step=cfg.gossip.max_version_step,
                max_join_size=cfg.gossip.max_join_size,
            ),
        )
        self.gossip.attach(gossiper)
        self.syncer = ClusterSyncer(
            self.cluster, gossiper, self._on_node_gone, self._on_remote_endpoint
        )
        # 4. Gossip and join before serving: the first request a client sends us is then
        #    routed to endpoints on other nodes instead of getting 502 (as Piko's server.go
        #    does). A join that fails is retried in the background; we serve alone meanwhile.
        self.syncer.publish_local()
        self.gossip.start()
        if cfg.cluster.join and not await self._join_once():
            self._join_task = asyncio.get_running_loop().create_task(self._join_retry())
        # 5. Agents, then clients: connections that queued in the backlog since step 3 are
        #    accepted now. Ready last, when every port serves.
        await self.upstream_server.serve()
        assert self._proxy_server is not None
        await self._proxy_server.start_serving()
        self.admin.ready = True
        _log.info(
            "node started",
            node_id=self.node_id,
            proxy_addr=self.addrs.proxy_advertise,
            upstream_addr=self.addrs.upstream_advertise,
            admin_addr=self.addrs.admin_advertise,
            build=native.build_mode(),  # compiled with mypyc, or pure Python (pico.native)
        )

    def _observer(self) -> Observer:
        """What happens after each request: metrics, the dashboard's history, and the access
        log unless disabled."""
        metrics = self.metrics.observe
        history = self.history.observe
        if self.config.proxy.access_log.disable:

            def observe_quietly(record: RequestRecord) -> None:
                metrics(record)
                history(record)

            return observe_quietly
        access = AccessLog(self.config.proxy.access_log)

        def observe(record: RequestRecord) -> None:
            metrics(record)
            history(record)
            access(record)

        return observe

    async def _bind_gossip(self, bind: str) -> tuple[str, int]:
        host, port = parse_host_port(bind, key="gossip.bind_addr")
        self.gossip.host, self.gossip.port = host, port
        try:
            return host, await self.gossip.bind()
        except OSError as exc:
            raise StartupError(
                f"gossip.bind_addr: cannot listen on {bind!r}: {exc.strerror or exc}"
            ) from exc

    async def _join_once(self) -> bool:
        """One join attempt; true if some member (ourselves included) answered."""
        joined, errors = await self.gossip.join(list(self.config.cluster.join))
        if joined or not errors:
            _log.info("joined cluster", members=sorted(set(joined)))
            return True
        _log.warn("cluster join failed", errors=errors)
        self._join_errors = errors
        return False

    async def _join_retry(self) -> None:
        """Retry the join with backoff (1 s doubling to 30 s) until `cluster.join_timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.cluster.join_timeout
        delay = 1.0
        while loop.time() < deadline:
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            if await self._join_once():
                return
            delay = min(delay * 2, 30.0)
        if self.config.cluster.abort_if_join_fails:
            message = "cluster.join: could not join any member: " + "; ".join(self._join_errors)
            _log.error("aborting: cluster join failed", errors=self._join_errors)
            if not self.fatal.done():
                self.fatal.set_result(message)
        else:
            _log.warn("giving up joining; running alone until a member joins us")

    @staticmethod
    def _advertise(bound: tuple[str, int]) -> str:
        return _join_host_port(advertise_host(bound[0]), bound[1])

    async def _start_app(
        self, app: web.Application, bind: str, key: str, tls: ssl.SSLContext | None
    ) -> tuple[web.AppRunner, tuple[str, int]]:
        try:
            return await serve_app(app, bind, key, tls, self.admin_guard)
        except BindError as exc:
            raise StartupError(str(exc)) from exc

    async def _start_upstream(self, bind: str) -> tuple[str, int]:
        host, port = parse_host_port(bind, key="upstream.bind_addr")
        try:
            return host, await self.upstream_server.start(host, port, self.tls.get("upstream"))
        except OSError as exc:
            raise StartupError(
                f"upstream.bind_addr: cannot listen on {bind!r}: {exc.strerror or exc}"
            ) from exc

    async def _start_proxy(self, bind: str) -> tuple[str, int]:
        host, port = parse_host_port(bind, key="proxy.bind_addr")
        loop = asyncio.get_running_loop()
        router, limits, conns = self.router, self.limits, self.connections
        observe = self._observer()
        verifier = self.verifiers.get("proxy")
        keep = self.config.proxy.auth.disable_disconnect_on_expiry
        auth = ProxyAuth(verifier, disconnect_on_expiry=not keep) if verifier is not None else None
        proof = MemberProof(self.keyring) if self.keyring is not None else None
        try:
            server = await loop.create_server(
                lambda: ProxyConnection(
                    router,
                    limits,
                    observe,
                    conns,
                    self._is_peer,
                    auth,
                    forward_proof=proof,
                    protocol_of=self.registry.protocol_of,
                ),
                host or None,
                port,
                reuse_address=True,
                backlog=2048,
                start_serving=False,
                ssl=self.tls.get("proxy"),
                # The handshake is part of the head a client owes us.
                ssl_handshake_timeout=(self.limits.read_header_timeout or None)
                if "proxy" in self.tls
                else None,
            )
        except OSError as exc:
            raise StartupError(
                f"proxy.bind_addr: cannot listen on {bind!r}: {exc.strerror or exc}"
            ) from exc
        self._proxy_server = server
        return host, int(server.sockets[0].getsockname()[1])

    # -- stop ------------------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Drain and stop, within `server.graceful_shutdown_timeout`."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        timeout = self.config.server.graceful_shutdown_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.admin.ready = False
        _log.info("shutting down", node_id=self.node_id, grace_period=timeout)
        if self._proxy_server is not None:
            self._proxy_server.close()
        for conn in self.connections.snapshot():
            conn.close_when_idle()
        if self._join_task is not None:
            self._join_task.cancel()
        # Agents move to other nodes as soon as they see GoAway; in-flight streams finish.
        drain = asyncio.ensure_future(
            self.upstream_server.close_all(max(0.0, deadline - loop.time()))
        )
        if self.syncer is not None:
            # Peers stop routing here at once; requests already here still finish.
            acked = await self.gossip.leave(min(5.0, max(0.1, deadline - loop.time())))
            _log.info("left cluster", notified=acked)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connections.wait_empty(), max(0.0, deadline - loop.time()))
        for conn in self.connections.snapshot():
            conn.stop()
        with contextlib.suppress(Exception):
            await drain
        await self._cleanup()
        _log.info("shutdown complete", node_id=self.node_id)

    async def _cleanup(self) -> None:
        for task in self._key_tasks:
            task.cancel()
        await asyncio.gather(*self._key_tasks, return_exceptions=True)
        self._key_tasks.clear()
        await self.gossip.close()
        self.node_upstreams.close()
        if self._proxy_server is not None:
            self._proxy_server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._proxy_server.wait_closed(), 1.0)
        await self.upstream_server.close()
        for runner in (self._admin_runner,):
            if runner is not None:
                with contextlib.suppress(Exception):
                    await runner.cleanup()


def _gossip_meta(meta: object, now: float) -> dict[str, object]:
    """The `/status/gossip/nodes` shape; `expiry` in seconds from now (null when not set)."""
    expiry = getattr(meta, "expiry", None)
    return {
        "id": getattr(meta, "id", ""),
        "addr": getattr(meta, "addr", ""),
        "version": getattr(meta, "version", 0),
        "left": getattr(meta, "left", False),
        "unreachable": getattr(meta, "unreachable", False),
        "expiry": None if expiry is None else round(max(0.0, expiry - now), 3),
    }
