"""The schema: frozen pydantic models for ``pico server`` and ``pico agent``.

Every field has a description (shown by ``-h``) and a default; validators turn bad values
into errors that name the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from pico.config.values import _split_host_port, format_duration, parse_duration


class _Kind:
    """Metadata marker describing how a field is presented on the command line."""

    def __init__(self, name: str) -> None:
        self.name = name


_DURATION = _Kind("duration")
# A key set in YAML only (a list of sections has no flag: ``listeners``).
_YAML_ONLY = _Kind("yaml-only")


def _to_duration(value: object) -> float:
    return parse_duration(cast("str | int | float", value))


def _non_negative(value: float) -> float:
    if value < 0:
        raise ValueError(f"must not be negative (got {format_duration(value)})")
    return value


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError(f"must be greater than 0 (got {format_duration(value)})")
    return value


def _bind_addr(value: str) -> str:
    _split_host_port(value)
    return value


def _advertise_addr(value: str) -> str:
    if value == "":
        return value
    return _bind_addr(value)


_NODE_ID = re.compile(r"[A-Za-z0-9._-]*")
_ENDPOINT_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def _node_id(value: str) -> str:
    if not _NODE_ID.fullmatch(value):
        raise ValueError(f"invalid node id {value!r} (allowed characters: A-Z a-z 0-9 . _ -)")
    return value


def _split_list(value: object) -> object:
    """Accept a comma-separated string (or a list of them) for list keys."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        out: list[object] = []
        for item in value:
            if isinstance(item, str):
                out.extend(p.strip() for p in item.split(",") if p.strip())
            else:
                out.append(item)
        return out
    return value


_LEVEL_ALIASES = {"warning": "warn", "err": "error"}


def _log_level(value: object) -> object:
    if isinstance(value, str):
        v = value.strip().lower()
        v = _LEVEL_ALIASES.get(v, v)
        if v not in ("debug", "info", "warn", "error"):
            raise ValueError(f"invalid level {value!r} (use debug, info, warn or error)")
        return v
    return value


Duration = Annotated[float, BeforeValidator(_to_duration), AfterValidator(_non_negative), _DURATION]
PositiveDuration = Annotated[
    float, BeforeValidator(_to_duration), AfterValidator(_positive), _DURATION
]
BindAddr = Annotated[str, AfterValidator(_bind_addr)]
AdvertiseAddr = Annotated[str, AfterValidator(_advertise_addr)]
NodeId = Annotated[str, AfterValidator(_node_id)]
StrList = Annotated[list[str], BeforeValidator(_split_list)]
LogLevel = Annotated[Literal["debug", "info", "warn", "error"], BeforeValidator(_log_level)]


class _Model(BaseModel):
    """Base for all config models: frozen, strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        # An empty YAML value (``proxy:`` or ``node_id:``) means "use the default".
        if isinstance(data, Mapping):
            return {k: v for k, v in data.items() if not (v is None and k in cls.model_fields)}
        return data


# ---------------------------------------------------------------------------
# Server schema
# ---------------------------------------------------------------------------


class HeaderFilter(_Model):
    """Which headers an access log line shows (names are case-insensitive)."""

    allow_list: StrList = Field(
        default_factory=list,
        description="Only these headers are logged (when set; block_list is then ignored).",
    )
    block_list: StrList = Field(
        default_factory=list,
        description="Headers never logged (e.g. authorization, cookie), when allow_list is empty.",
    )

    @model_validator(mode="after")
    def _one_list(self) -> HeaderFilter:
        if self.allow_list and self.block_list:
            raise ValueError("allow_list and block_list cannot both be set")
        return self


class AccessLogConfig(_Model):
    """``proxy.access_log``: one line per proxied request (subsystem ``proxy.access``)."""

    disable: bool = Field(False, description="Turn the access log off.")
    level: LogLevel = Field(
        "info", description="Level of access log lines (5xx responses are logged at warn at least)."
    )
    request_headers: HeaderFilter = Field(default_factory=HeaderFilter)
    response_headers: HeaderFilter = Field(default_factory=HeaderFilter)


def _cidrs(values: list[str]) -> list[str]:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"not a CIDR or an IP address: {value!r}") from None
    return values


class TlsConfig(_Model):
    """``<port>.tls``: serve the port over TLS (https, wss), optionally requiring client certs."""

    cert: str = Field("", description="Certificate chain (PEM file): with key, the port is TLS.")
    key: str = Field("", description="Private key of cert (PEM file).")
    client_cas: str = Field(
        "",
        description="CA certificates (PEM file): clients must present a certificate signed by "
        "one of them (mTLS). Needs cert and key.",
    )

    @model_validator(mode="after")
    def _files(self) -> TlsConfig:
        from pico.tls import check_cas, check_pair

        check_pair(self.cert, self.key)
        if self.client_cas and not self.cert:
            raise ValueError("client_cas: needs cert and key (mTLS is on top of TLS)")
        check_cas(self.client_cas, "client_cas")
        return self

    @property
    def enabled(self) -> bool:
        """True when the port speaks TLS."""
        return bool(self.cert)


class _ClientTls(_Model):
    """What a TLS client is configured with: the CAs it trusts and the certificate it shows.
    Subclasses describe the fields for where they are used; the files are checked here."""

    root_ca: str = ""
    cert: str = ""
    key: str = ""

    @model_validator(mode="after")
    def _files(self) -> _ClientTls:
        from pico.tls import check_cas, check_pair

        check_pair(self.cert, self.key)
        check_cas(self.root_ca, "root_ca")
        return self


class ClusterTlsConfig(_ClientTls):
    """``cluster.tls``: how this node connects to other nodes' TLS ports (forwarding, admin)."""

    root_ca: str = Field(
        "",
        description="CA certificates (PEM file) that other nodes' certificates are verified "
        "against (the system's roots when empty).",
    )
    cert: str = Field(
        "", description="Certificate (PEM file) this node presents to nodes that require mTLS."
    )
    key: str = Field("", description="Private key of cert (PEM file).")
    server_name: str = Field(
        "",
        description="Name other nodes' certificates must be valid for (default: the host of "
        "the address each node advertises).",
    )


class JwksConfig(_Model):
    """``<port>.auth.jwks``: keys from a JSON Web Key Set, selected by `kid`."""

    endpoint: str = Field(
        "",
        description="JWKS location: file:///path (read at start) or https://... (fetched, "
        "then refreshed every cache_ttl and when a token names an unknown kid, at most once "
        "a second). Not together with the static keys.",
    )
    cache_ttl: PositiveDuration = Field(300.0, description="How long a fetched JWKS is used.")
    root_ca: str = Field(
        "",
        description="CA certificates (PEM file) an https endpoint is verified against (the "
        "system's roots when empty).",
    )

    @model_validator(mode="after")
    def _scheme(self) -> JwksConfig:
        if self.endpoint and not self.endpoint.startswith(("file://", "https://")):
            raise ValueError(f"endpoint: use file:// or https:// (got {self.endpoint!r})")
        if self.endpoint.startswith("file://"):
            path = self.endpoint[len("file://") :]
            if not os.path.isfile(path):
                raise ValueError(f"endpoint: no such file {path!r}")
        from pico.tls import check_cas

        check_cas(self.root_ca, "root_ca")
        return self


def _public_key(kind: str) -> Callable[[str], str]:
    """Validate a PEM public key given inline or as a path; errors name what is wrong."""

    def check(value: str) -> str:
        if not value:
            return value
        text = value
        if not value.lstrip().startswith("-----BEGIN"):
            if not os.path.isfile(value):
                raise ValueError(f"not a PEM key and no such file: {value!r}")
            with open(value) as f:
                text = f.read()
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        try:
            key = load_pem_public_key(text.encode())
        except ValueError:
            raise ValueError(f"not a PEM {kind} public key") from None
        wanted = rsa.RSAPublicKey if kind == "RSA" else ec.EllipticCurvePublicKey
        if not isinstance(key, wanted):
            raise ValueError(f"not an {kind} public key")
        return value

    return check


class AuthConfig(_Model):
    """``<port>.auth``: JWT verification; on when a key or a JWKS is set."""

    hmac_secret_key: str = Field("", description="HMAC secret: accepts HS256/384/512 tokens.")
    rsa_public_key: Annotated[str, AfterValidator(_public_key("RSA"))] = Field(
        "", description="RSA public key (PEM, inline or a path): accepts RS256/384/512 tokens."
    )
    ecdsa_public_key: Annotated[str, AfterValidator(_public_key("ECDSA"))] = Field(
        "", description="ECDSA public key (PEM, inline or a path): accepts ES256/384/512 tokens."
    )
    audience: str = Field("", description="Required `aud` claim (not checked if empty).")
    issuer: str = Field("", description="Required `iss` claim (not checked if empty).")
    allow_no_expiry: bool = Field(
        False, description="Accept tokens without an `exp` claim (never expire)."
    )
    jwks: JwksConfig = Field(default_factory=JwksConfig)

    @model_validator(mode="after")
    def _one_source(self) -> AuthConfig:
        static = self.hmac_secret_key or self.rsa_public_key or self.ecdsa_public_key
        if self.jwks.endpoint and static:
            raise ValueError("jwks.endpoint: not together with hmac/rsa/ecdsa keys")
        return self

    @property
    def enabled(self) -> bool:
        """True when a key or a JWKS is configured (tokens are then required)."""
        return bool(
            self.hmac_secret_key
            or self.rsa_public_key
            or self.ecdsa_public_key
            or self.jwks.endpoint
        )


class UpstreamAuthConfig(AuthConfig):
    """``upstream.auth``: tokens of agents."""

    disable_disconnect_on_expiry: bool = Field(
        False,
        description="Keep a tunnel open when its token expires (exp is still checked when "
        "it connects).",
    )


class ProxyAuthConfig(AuthConfig):
    """``proxy.auth``: tokens of clients."""

    disable_disconnect_on_expiry: bool = Field(
        False,
        description="Keep a connection a request upgraded (WebSocket, TCP endpoint) open when "
        "the token it came with expires (exp is still checked on every request).",
    )


class ProxyConfig(_Model):
    """``proxy``: the HTTP listener clients send requests to."""

    bind_addr: BindAddr = Field(":8000", description="Address the proxy server listens on.")
    advertise_addr: AdvertiseAddr = Field(
        "",
        description="Proxy address advertised to other nodes (derived from bind_addr if empty).",
    )
    timeout: Duration = Field(
        30.0,
        description="Time to wait for the upstream response head before 504 (0 disables).",
    )
    max_header_bytes: int = Field(
        65536, ge=1, description="Maximum size of a request head; larger heads get 431."
    )
    read_header_timeout: Duration = Field(
        10.0, description="Time a client has to send a complete request head (0 disables)."
    )
    idle_timeout: Duration = Field(
        300.0, description="Idle keep-alive client connections are closed after this (0 disables)."
    )
    upstream_wait: Duration = Field(
        5.0,
        description="How long a request waits for an upstream when its endpoint just lost all "
        "of them (a node restarting or failing while its agents reconnect elsewhere) before "
        "502; unknown endpoints are answered at once (0 disables).",
    )
    trusted_proxies: Annotated[list[str], BeforeValidator(_split_list), AfterValidator(_cidrs)] = (
        Field(
            default_factory=list,
            description="CIDRs of load balancers whose X-Forwarded-Proto/-Host are kept (e.g. "
            "10.0.0.0/8); from others Pico sets them from what it saw.",
        )
    )
    max_connections_per_ip: int = Field(
        4096,
        ge=0,
        description="Open client connections one IP address may have (0: no limit); more are "
        "closed at once. Trusted proxies and cluster members are not limited.",
    )
    stream_ack_timeout: Duration = Field(
        2.0,
        description="A request's tunnel stream that the agent has not answered after "
        "this long, while the agent sent nothing at all (frozen, overloaded), is reset and "
        "the request tried on another upstream: it never reached a service (0 disables). "
        "An agent dialing a TCP service has answered: its dial is bounded by its own timeout.",
    )
    access_log: AccessLogConfig = Field(default_factory=AccessLogConfig)
    auth: ProxyAuthConfig = Field(default_factory=ProxyAuthConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)


class UpstreamConfig(_Model):
    """``upstream``: the listener agents connect to."""

    bind_addr: BindAddr = Field(":8001", description="Address the upstream server listens on.")
    advertise_addr: AdvertiseAddr = Field(
        "", description="Upstream address advertised to other nodes (derived if empty)."
    )
    heartbeat_interval: PositiveDuration = Field(
        5.0, description="Interval between pings to each agent."
    )
    heartbeat_timeout: PositiveDuration = Field(
        5.0,
        description="A tunnel whose ping is not answered within this is closed: a frozen or "
        "unreachable agent leaves rotation within heartbeat_interval + heartbeat_timeout.",
    )
    max_tunnels: int = Field(
        10000,
        ge=1,
        description="Tunnels this node accepts in all; more agents get 503 (they retry, "
        "maybe through the load balancer to another node).",
    )
    max_tunnels_per_endpoint: int = Field(
        256, ge=1, description="Tunnels one endpoint may have on this node; more get 429."
    )
    max_streams_per_tunnel: int = Field(
        1024,
        ge=1,
        description="Streams (requests in flight plus idle keep-alive ones) open on one tunnel "
        "at once; a request finding every tunnel of its endpoint full gets 503.",
    )
    max_connections_per_ip: int = Field(
        1024,
        ge=0,
        description="Open connections (tunnels and upgrades in progress) one IP address may "
        "have on the upstream port (0: no limit); more get 429.",
    )
    max_control_frames: int = Field(
        10000,
        ge=1,
        description="Control frames (pongs, acks, resets, window updates) an agent may make "
        "the node queue while it does not read them; past it the tunnel is closed (ping and "
        "reset floods).",
    )
    auth: UpstreamAuthConfig = Field(default_factory=UpstreamAuthConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)


class AdminConfig(_Model):
    """``admin``: status, health and metrics endpoints."""

    bind_addr: BindAddr = Field(":8002", description="Address the admin server listens on.")
    advertise_addr: AdvertiseAddr = Field(
        "", description="Admin address advertised to other nodes (derived if empty)."
    )
    read_header_timeout: Duration = Field(
        10.0,
        description="Time a client has to send a complete request head (and finish a TLS "
        "handshake) on the admin port; slower connections are closed (0 disables).",
    )
    idle_timeout: Duration = Field(
        300.0,
        description="Idle keep-alive connections to the admin port are closed after this "
        "(0 disables).",
    )
    max_connections: int = Field(
        256,
        ge=0,
        description="Open admin connections at most (each costs a file descriptor the proxy "
        "needs too); when full, the one idle or waiting for its head the longest is closed to "
        "make room, or the new one gets 503 if all are busy (0: no limit).",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)


def _gossip_keys(values: list[str]) -> list[str]:
    from pico.gossip.seal import parse_key

    for i, value in enumerate(values):
        try:
            parse_key(value)
        except ValueError as exc:
            raise ValueError(f"key {i + 1}: {exc}") from None
    return values


GossipKeys = Annotated[list[str], BeforeValidator(_split_list), AfterValidator(_gossip_keys)]


class GossipConfig(_Model):
    """``gossip``: cluster membership and state propagation."""

    bind_addr: BindAddr = Field(":8003", description="Address gossip listens on (TCP and UDP).")
    advertise_addr: AdvertiseAddr = Field(
        "", description="Gossip address advertised to other nodes (derived if empty)."
    )
    interval: PositiveDuration = Field(0.5, description="Interval between gossip rounds.")
    max_packet_size: int = Field(
        1400, ge=512, description="Maximum size of a gossip UDP packet in bytes."
    )
    expiry: Duration = Field(
        60.0,
        description="How long a dead or left node is remembered before it is forgotten (and "
        "how long a node only named by peers, with no state yet, is kept).",
    )
    max_nodes: int = Field(
        1024,
        ge=2,
        description="Most nodes known at once (this one included); gossip naming more is "
        'dropped and counted in pico_gossip_rejected_total{reason="max_nodes"}.',
    )
    max_entries_per_node: int = Field(
        16384,
        ge=8,
        description="Most gossip entries (keys, tombstones included) held for one node; a node "
        'publishes at most this many less two. Over it: reason="max_entries".',
    )
    max_key_size: int = Field(
        256,
        ge=32,
        description='Largest gossip key or node id, in bytes. Over it: reason="key_size".',
    )
    max_value_size: int = Field(
        1024,
        ge=32,
        description="Largest gossip value or gossip address, in bytes. Over it: "
        'reason="value_size".',
    )
    max_version_step: int = Field(
        1 << 32,
        ge=1 << 16,
        description="How far one gossip delta may move a node's version past the one held (a "
        'node\'s own versions stay below it). Over it: reason="version_step".',
    )
    max_join_size: int = Field(
        16 << 20,
        ge=65536,
        description="Largest join/leave message over TCP, in bytes (a join carries the whole "
        'cluster state). Over it: reason="join_size".',
    )
    secret_keys: Annotated[
        list[str], BeforeValidator(_split_list), AfterValidator(_gossip_keys)
    ] = Field(
        default_factory=list,
        description="Base64 AES keys (16, 24 or 32 bytes): every gossip packet and "
        "join/leave is sealed with the first and opened with any (rotate by adding the new "
        "key second, then first, then dropping the old). Empty: gossip is not authenticated.",
    )

    @model_validator(mode="after")
    def _check_limits(self) -> GossipConfig:
        if self.max_version_step < 2 * self.max_entries_per_node:
            # A node re-versions its entries from 1 when it starts a new incarnation.
            raise ValueError("gossip.max_version_step must be at least 2 x max_entries_per_node")
        if self.max_join_size < self.max_packet_size:
            raise ValueError("gossip.max_join_size must be at least max_packet_size")
        return self


class ClusterConfig(_Model):
    """``cluster``: node identity and joining."""

    node_id: NodeId = Field("", description="Unique node ID (random if empty).")
    node_id_prefix: NodeId = Field(
        "", description="Node ID prefix; a random suffix is appended (cannot be used with node_id)."
    )
    join: StrList = Field(
        default_factory=list,
        description="Gossip addresses or DNS names of cluster members to join (every A/AAAA "
        "record of a name is tried; the port defaults to the gossip port).",
    )
    join_timeout: Duration = Field(
        60.0,
        description="How long to keep retrying the join (with backoff) before giving up.",
    )
    abort_if_join_fails: bool = Field(
        True, description="Exit 1 if no member could be joined within join_timeout."
    )
    tls: ClusterTlsConfig = Field(default_factory=ClusterTlsConfig)

    @model_validator(mode="after")
    def _check_ids(self) -> ClusterConfig:
        if self.node_id and self.node_id_prefix:
            raise ValueError("cluster.node_id and cluster.node_id_prefix cannot both be set")
        return self


class ServerSection(_Model):
    """``server`` (server side): process-level settings."""

    graceful_shutdown_timeout: PositiveDuration = Field(
        60.0,
        description="Maximum time to drain connections on shutdown; upgraded connections "
        "(WebSockets) still open then are closed.",
    )


class LogConfig(_Model):
    """``log``: structured JSON logs on stderr."""

    level: LogLevel = Field("info", description="Minimum log level: debug, info, warn or error.")
    subsystems: StrList = Field(
        default_factory=list,
        description="Subsystems logged at every level regardless of log.level (exact match).",
    )


class ServerConfig(_Model):
    """Configuration of ``pico server``."""

    proxy: ProxyConfig = Field(default_factory=ProxyConfig)
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    gossip: GossipConfig = Field(default_factory=GossipConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    server: ServerSection = Field(default_factory=ServerSection)
    log: LogConfig = Field(default_factory=LogConfig)


# ---------------------------------------------------------------------------
# Agent schema
# ---------------------------------------------------------------------------


ListenerProtocol = Literal["http", "tcp"]


@dataclass(frozen=True)
class EndpointSpec:
    """A parsed agent endpoint (a listener): streams for ``endpoint_id`` go to ``host:port``,
    or to the Unix socket ``unix_path`` when that is set (then ``host`` is "" and ``port`` 0).

    ``protocol`` is what the node serves it as (HTTP requests, or raw TCP connections through
    ``/_pico/v1/tcp/{id}``); ``tls``: the agent speaks TLS to the service (an https URL).
    ``timeout`` bounds connecting to the service (None: ``forwarder.timeout``).
    """

    endpoint_id: str
    host: str
    port: int
    protocol: ListenerProtocol = "http"
    tls: bool = False
    timeout: float | None = None
    access_log: bool = False
    unix_path: str = ""

    @property
    def service(self) -> str:
        """Where the service is, for logs: host:port or unix:PATH."""
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"


# `--endpoints id/unix:PATH`: the service listens on a Unix socket (PATH may contain "/").
_UNIX_PREFIX = "unix:"


def unix_socket_path(addr: str) -> str | None:
    """The path of a "unix:PATH" address (None for any other); ValueError if PATH is bad."""
    if not addr.startswith(_UNIX_PREFIX):
        return None
    path = addr[len(_UNIX_PREFIX) :]
    if not path or "\0" in path:
        raise ValueError(f"invalid Unix socket address {addr!r} (expected unix:/path/to.sock)")
    return path


def parse_endpoint(value: str) -> EndpointSpec:
    """Parse "id/addr" (addr: "host:port", a bare port -> localhost, or "unix:PATH");
    ValueError if bad."""
    endpoint_id, slash, addr = (part.strip() for part in value.partition("/"))
    if not slash or ("/" in addr and not addr.startswith(_UNIX_PREFIX)):
        raise ValueError(f"invalid endpoint {value!r} (expected <endpoint-id>/<addr>)")
    if not _ENDPOINT_ID.fullmatch(endpoint_id):
        raise ValueError(
            f"invalid endpoint id {endpoint_id!r} in {value!r} "
            "(1-128 characters of A-Z a-z 0-9 . _ -)"
        )
    path = unix_socket_path(addr)
    if path is not None:
        return EndpointSpec(endpoint_id, "", 0, unix_path=path)
    if addr.isdigit():
        host, port = "localhost", int(addr)
    else:
        try:
            host, port = _split_host_port(addr)
        except ValueError:
            raise ValueError(
                f"invalid endpoint address {addr!r} in {value!r} (expected host:port or port)"
            ) from None
        host = host or "localhost"
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid endpoint port {port} in {value!r} (1-65535)")
    return EndpointSpec(endpoint_id, host, port)


def _endpoint(value: str) -> str:
    parse_endpoint(value)
    return value


def parse_listener_addr(addr: str, protocol: str) -> tuple[str, int, bool]:
    """(host, port, tls) of a listener address: a port, host:port, or (http) an http(s) URL.

    Raises ValueError saying what is wrong.
    """
    addr = addr.strip()
    if "://" in addr:
        if protocol != "http":
            raise ValueError(f"addr {addr!r}: a URL is for http listeners (use host:port for tcp)")
        parsed = urllib.parse.urlsplit(addr)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"addr {addr!r}: expected http://host[:port] or https://host[:port]")
        if parsed.path not in ("", "/") or parsed.query:
            raise ValueError(f"addr {addr!r}: a path prefix is not supported")
        try:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
        except ValueError:
            raise ValueError(f"addr {addr!r}: bad port") from None
        return parsed.hostname, port, parsed.scheme == "https"
    if addr.isdigit():
        host, port = "localhost", int(addr)
    else:
        try:
            host, port = _split_host_port(addr)
        except ValueError:
            raise ValueError(f"addr {addr!r}: expected a port, host:port or a URL") from None
        host = host or "localhost"
    if not 1 <= port <= 65535:
        raise ValueError(f"addr {addr!r}: port {port} out of range (1-65535)")
    return host, port, False


class ListenerConfig(_Model):
    """One entry of ``listeners``: an endpoint the agent registers, and where its service is."""

    endpoint_id: Annotated[str, AfterValidator(check_endpoint_id)] = Field(
        description="Endpoint to register."
    )
    addr: str = Field(
        description="The service: a port, host:port, unix:PATH (a Unix socket), or for http a "
        "URL (https://host:port: the agent speaks TLS to the service, verified with "
        "tls.root_ca)."
    )
    protocol: str = Field("http", description="http (requests) or tcp (raw connections).")
    access_log: bool = Field(
        False, description="Log one line per connection the agent makes to the service."
    )
    timeout: Duration | None = Field(
        None, description="How long to wait connecting to the service (forwarder.timeout)."
    )

    @model_validator(mode="after")
    def _check(self) -> ListenerConfig:
        if self.protocol not in ("http", "tcp"):
            raise ValueError(
                f"listener {self.endpoint_id!r}: unknown protocol {self.protocol!r} "
                "(use http or tcp)"
            )
        try:
            if unix_socket_path(self.addr) is None:
                parse_listener_addr(self.addr, self.protocol)
        except ValueError as exc:
            raise ValueError(f"listener {self.endpoint_id!r}: {exc}") from None
        return self

    def spec(self) -> EndpointSpec:
        """This listener as an :class:`EndpointSpec`."""
        protocol = cast(ListenerProtocol, self.protocol)
        path = unix_socket_path(self.addr)
        if path is not None:
            return EndpointSpec(
                self.endpoint_id, "", 0, protocol, False, self.timeout, self.access_log, path
            )
        host, port, tls = parse_listener_addr(self.addr, self.protocol)
        return EndpointSpec(
            self.endpoint_id, host, port, protocol, tls, self.timeout, self.access_log
        )


def check_endpoint_id(value: str) -> str:
    """`value` if it is a valid endpoint id; ValueError saying the rule, else."""
    if not _ENDPOINT_ID.fullmatch(value):
        raise ValueError(f"invalid endpoint id {value!r} (1-128 characters of A-Z a-z 0-9 . _ -)")
    return value


def _http_url(value: str) -> str:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"invalid URL {value!r} (must be http://host[:port] or https://...)")
    try:
        _ = parsed.port
    except ValueError:
        raise ValueError(f"invalid URL {value!r}: bad port") from None
    return value


class AgentTlsConfig(_ClientTls):
    """``server.tls`` (agent side): verifying an https server, and the agent's own certificate."""

    root_ca: str = Field(
        "",
        description="CA certificates (PEM file) the server's certificate is verified against "
        "(the system's roots when empty).",
    )
    cert: str = Field(
        "", description="Client certificate (PEM file), for servers that require mTLS."
    )
    key: str = Field("", description="Private key of cert (PEM file).")
    insecure_skip_verify: bool = Field(
        False,
        description="Do not verify the server's certificate (testing only: anyone on the path "
        "can then read and change the tunnel).",
    )


def _check_server_tls(url: str, tls: AgentTlsConfig) -> None:
    """`server.tls` means something only for an https `server.url`: say so, else."""
    if (tls.root_ca or tls.cert or tls.insecure_skip_verify) and not url.startswith("https"):
        raise ValueError("server.tls: set, but server.url is not https://")


class AgentServerSection(_Model):
    """``server`` (agent side): how to reach the Pico server."""

    url: Annotated[str, AfterValidator(_http_url)] = Field(
        "http://localhost:8001", description="Pico server upstream URL (http or https)."
    )
    heartbeat_interval: PositiveDuration = Field(
        10.0, description="Interval between heartbeats to the server."
    )
    heartbeat_timeout: PositiveDuration = Field(
        10.0, description="Reconnect if a heartbeat is not answered within this time."
    )
    mask_frames: bool = Field(
        False,
        description="Mask tunnel frames with random keys (RFC 6455 client masking). Off: "
        "frames carry the all-zero key, which saves copying every byte on both sides. Turn "
        "it on when the agent reaches a plain-http server through a transparent HTTP proxy "
        "that does not understand WebSocket.",
    )
    tls: AgentTlsConfig = Field(default_factory=AgentTlsConfig)


class ServiceTlsConfig(_ClientTls):
    """``tls`` (agent side): verifying the services of https listeners."""

    root_ca: str = Field(
        "",
        description="CA certificates (PEM file) an https service's certificate is verified "
        "against (the system's roots when empty).",
    )
    cert: str = Field("", description="Client certificate (PEM file) for services that want one.")
    key: str = Field("", description="Private key of cert (PEM file).")
    insecure_skip_verify: bool = Field(
        False, description="Do not verify https services' certificates (testing only)."
    )


class AgentAuthConfig(_Model):
    """``auth`` (agent side)."""

    api_key: str = Field("", description="API key (JWT) sent as 'Authorization: Bearer <key>'.")


class ForwarderConfig(_Model):
    """``forwarder``: requests to the local services."""

    timeout: Duration = Field(
        10.0,
        description="How long the agent waits to connect to the local service for a request "
        "(the node answers 504 when it runs out); it does not bound the response, which the "
        "node's proxy.timeout does.",
    )


class AgentAdminConfig(_Model):
    """``admin`` (agent side): health and metrics."""

    bind_addr: BindAddr = Field(":9000", description="Address the agent admin server listens on.")


class AgentConfig(_Model):
    """Configuration of ``pico agent``."""

    endpoints: Annotated[
        list[Annotated[str, AfterValidator(_endpoint)]], BeforeValidator(_split_list)
    ] = Field(
        default_factory=list,
        description="Endpoints to register, each '<endpoint-id>/<addr>' (addr: host:port, port, "
        "or unix:PATH for a service on a Unix socket).",
    )
    listeners: Annotated[list[ListenerConfig], _YAML_ONLY] = Field(
        default_factory=list,
        description="Endpoints to register (YAML), each {endpoint_id, addr, protocol, "
        "access_log, timeout}.",
    )
    server: AgentServerSection = Field(default_factory=AgentServerSection)
    auth: AgentAuthConfig = Field(default_factory=AgentAuthConfig)
    tls: ServiceTlsConfig = Field(default_factory=ServiceTlsConfig)
    forwarder: ForwarderConfig = Field(default_factory=ForwarderConfig)
    admin: AgentAdminConfig = Field(default_factory=AgentAdminConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    max_streams: int = Field(
        1024,
        ge=1,
        description="Streams a node may have open on one tunnel at once (each is a connection "
        "to the service); more are refused, and the node tries another upstream.",
    )
    max_draining_tunnels: int = Field(
        4,
        ge=1,
        description="Tunnels of one endpoint that a node sent GoAway on, kept while their "
        "streams finish (each may hold max_streams service connections) beside the new "
        "tunnel; past it the oldest is closed, its streams cut. A node restart needs one.",
    )

    @model_validator(mode="after")
    def _unique_endpoints(self) -> AgentConfig:
        seen: dict[str, str] = {}
        for value in self.endpoints:
            spec = parse_endpoint(value)
            key = spec.endpoint_id.lower()  # ids fold ASCII case: `A` and `a` are one endpoint
            if key in seen:
                raise ValueError(
                    f"endpoints: endpoint id {spec.endpoint_id!r} is given twice "
                    f"({seen[key]!r} and {value!r})"
                )
            seen[key] = value
        for listener in self.listeners:
            key = listener.endpoint_id.lower()
            if key in seen:
                raise ValueError(
                    f"listeners: listener {listener.endpoint_id!r} is given twice "
                    f"(endpoint ids must be unique)"
                )
            seen[key] = listener.endpoint_id
        return self

    @model_validator(mode="after")
    def _tls_needs_https(self) -> AgentConfig:
        _check_server_tls(self.server.url, self.server.tls)
        return self

    def parsed_endpoints(self) -> list[EndpointSpec]:
        """The endpoints as :class:`EndpointSpec` values."""
        return [parse_endpoint(e) for e in self.endpoints]

    def listener_specs(self) -> list[EndpointSpec]:
        """Every endpoint to register: ``endpoints`` (http), then ``listeners``."""
        return [*self.parsed_endpoints(), *(listener.spec() for listener in self.listeners)]


# ---------------------------------------------------------------------------
# Forward schema (``pico forward``)
# ---------------------------------------------------------------------------


class ForwardServerSection(_Model):
    """``server`` (forward side): the proxy port TCP connections are carried through."""

    url: Annotated[str, AfterValidator(_http_url)] = Field(
        "http://localhost:8000", description="Pico proxy URL (http or https)."
    )
    # Above the agents' dial timeout (forwarder.timeout, 10 s): the node answers a service
    # that does not accept in time with 504 before this side gives up on the node itself.
    timeout: PositiveDuration = Field(
        15.0,
        description="How long connecting to the proxy port and its answer may take (the "
        "answer waits for the agent to connect to the service).",
    )
    tls: AgentTlsConfig = Field(default_factory=AgentTlsConfig)


class ForwardConfig(_Model):
    """Configuration of ``pico forward``."""

    server: ForwardServerSection = Field(default_factory=ForwardServerSection)
    auth: AgentAuthConfig = Field(default_factory=AgentAuthConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    max_connections: int = Field(
        1024,
        ge=1,
        description="Local connections carried at once; more are closed when accepted (each "
        "holds a WebSocket to the node and up to one 256 KiB read buffer).",
    )

    @model_validator(mode="after")
    def _tls_needs_https(self) -> ForwardConfig:
        _check_server_tls(self.server.url, self.server.tls)
        return self
