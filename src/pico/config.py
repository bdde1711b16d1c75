"""Configuration for ``pico server`` and ``pico agent``: one typed schema, YAML and flags.

The schema is a tree of frozen pydantic models. Every leaf key is reachable from YAML
(nested sections, ``proxy: {bind_addr: ":8000"}``) and from a command-line flag named
after its dotted path (``proxy.bind_addr`` <-> ``--proxy.bind-addr``). Load order:
defaults, then the YAML file (``--config.path``, optionally env-expanded with
``--config.expand-env``), then flags given explicitly (flags override the file).
Unknown keys and bad values raise :class:`ConfigError` naming the key.

Durations are stored as float seconds; YAML and flags accept ``"500ms"``, ``"30s"``,
``"1m30s"`` or bare numbers (seconds).
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, cast

import click
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

__all__ = [
    "AgentConfig",
    "ConfigError",
    "EndpointSpec",
    "ServerConfig",
    "config_options",
    "describe",
    "expand_env",
    "format_duration",
    "load_config",
    "load_config_dict",
    "param_name",
    "parse_duration",
    "parse_host_port",
]

M = TypeVar("M", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Any])


class ConfigError(Exception):
    """A configuration problem; the message names the offending key."""


# ---------------------------------------------------------------------------
# Scalar parsers
# ---------------------------------------------------------------------------

_DURATION_UNITS: dict[str, float] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NUMBER = re.compile(r"[+-]?(\d+(?:\.\d*)?|\.\d+)")
_DURATION_HINT = "(use e.g. 500ms, 30s, 1m)"


def parse_duration(value: str | int | float) -> float:
    """Parse a Go-style duration ("500ms", "1m30s", "2h", "0") or bare seconds into seconds.

    Raises ``ValueError`` with a message such as
    ``invalid duration 'abc' (use e.g. 500ms, 30s, 1m)``.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r} {_DURATION_HINT}")
    if isinstance(value, int | float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"invalid duration {value!r} {_DURATION_HINT}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r} {_DURATION_HINT}")
    text = value.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    sign = 1.0
    body = text
    if body[:1] in "+-" and body:
        sign = -1.0 if body[0] == "-" else 1.0
        body = body[1:]
    if not body:
        raise ValueError(f"invalid duration {value!r} {_DURATION_HINT}")
    total = 0.0
    pos = 0
    while pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if m is None:
            raise ValueError(f"invalid duration {value!r} {_DURATION_HINT}")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def format_duration(seconds: float) -> str:
    """Format seconds as a compact duration string ("500ms", "30s", "1m30s", "0s")."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    ms_total = round(abs(seconds) * 1000)
    if ms_total == 0:
        return f"{sign}{abs(seconds):g}s"
    hours, rem = divmod(ms_total, 3_600_000)
    minutes, rem = divmod(rem, 60_000)
    secs, ms = divmod(rem, 1000)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if secs and ms:
        parts.append(f"{secs}.{ms:03d}".rstrip("0") + "s")
    elif secs:
        parts.append(f"{secs}s")
    elif ms:
        parts.append(f"{ms}ms" if not parts else f"0.{ms:03d}".rstrip("0") + "s")
    return sign + "".join(parts)


_SPECIAL_VARS = set("*#$@!?-0123456789")


def _is_name_char(c: str) -> bool:
    return c == "_" or ("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9")


def _shell_name(s: str) -> tuple[str, int]:
    """Go ``os.getShellName``: the variable name after a '$' and how many chars it used."""
    if s[0] == "{":
        if len(s) > 2 and s[1] in _SPECIAL_VARS and s[2] == "}":
            return s[1:2], 3
        end = s.find("}", 1)
        if end == -1:
            return "", 1  # bad syntax: eat "${"
        if end == 1:
            return "", 2  # bad syntax: eat "${}"
        return s[1:end], end + 1
    if s[0] in _SPECIAL_VARS:
        return s[0], 1
    i = 0
    while i < len(s) and _is_name_char(s[i]):
        i += 1
    return s[:i], i


def expand_env(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Expand ``$VAR``, ``${VAR}`` and ``${VAR:default}`` (Go ``os.Expand`` rules).

    Undefined variables expand to "". The default is used when the variable is unset or
    empty (split at the first ':'). A '$' not followed by a name is kept.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    out: list[str] = []
    i = 0
    j = 0
    n = len(text)
    while j < n:
        if text[j] == "$" and j + 1 < n:
            out.append(text[i:j])
            name, width = _shell_name(text[j + 1 :])
            if name == "" and width > 0:
                pass  # invalid syntax: characters eaten
            elif name == "":
                out.append("$")
            else:
                default = ""
                if ":" in name:
                    name, default = name.split(":", 1)
                out.append(env.get(name, "") or default)
            j += width
            i = j + 1
        j += 1
    out.append(text[i:])
    return "".join(out)


def _split_host_port(value: str) -> tuple[str, int]:
    """Split "host:port" (host may be empty or a bracketed IPv6 address); ValueError if bad."""
    if not isinstance(value, str):
        raise ValueError(f"invalid address {value!r} (expected host:port)")
    text = value.strip()
    bad = ValueError(f"invalid address {value!r} (expected host:port, e.g. :8000)")
    if text.startswith("["):
        end = text.find("]")
        if end == -1 or text[end + 1 : end + 2] != ":":
            raise bad
        host, port_s = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise bad from None
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep or not _HOST.fullmatch(host):
            raise bad
    if not port_s.isdigit():
        raise bad
    port = int(port_s)
    if port > 65535:
        raise ValueError(f"invalid address {value!r}: port {port} out of range (0-65535)")
    return host, port


def parse_host_port(value: str, *, key: str) -> tuple[str, int]:
    """Parse "host:port" (":8000" -> ("", 8000), "[::1]:8000" -> ("::1", 8000)).

    Raises :class:`ConfigError` naming ``key`` if the address is malformed.
    """
    try:
        return _split_host_port(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


# ---------------------------------------------------------------------------
# Field types
# ---------------------------------------------------------------------------


class _Kind:
    """Metadata marker describing how a field is presented on the command line."""

    def __init__(self, name: str) -> None:
        self.name = name


_DURATION = _Kind("duration")


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


_HOST = re.compile(r"[A-Za-z0-9._-]*")
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
    access_log: AccessLogConfig = Field(default_factory=AccessLogConfig)


class UpstreamConfig(_Model):
    """``upstream``: the listener agents connect to."""

    bind_addr: BindAddr = Field(":8001", description="Address the upstream server listens on.")
    advertise_addr: AdvertiseAddr = Field(
        "", description="Upstream address advertised to other nodes (derived if empty)."
    )


class AdminConfig(_Model):
    """``admin``: status, health and metrics endpoints."""

    bind_addr: BindAddr = Field(":8002", description="Address the admin server listens on.")
    advertise_addr: AdvertiseAddr = Field(
        "", description="Admin address advertised to other nodes (derived if empty)."
    )


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
        60.0, description="How long a dead or left node is remembered before it is forgotten."
    )


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

    @model_validator(mode="after")
    def _check_ids(self) -> ClusterConfig:
        if self.node_id and self.node_id_prefix:
            raise ValueError("cluster.node_id and cluster.node_id_prefix cannot both be set")
        return self


class ServerSection(_Model):
    """``server`` (server side): process-level settings."""

    graceful_shutdown_timeout: PositiveDuration = Field(
        60.0, description="Maximum time to drain connections on shutdown."
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


@dataclass(frozen=True)
class EndpointSpec:
    """A parsed agent endpoint: requests for ``endpoint_id`` go to ``host:port``."""

    endpoint_id: str
    host: str
    port: int


def parse_endpoint(value: str) -> EndpointSpec:
    """Parse "id/addr" (addr: "host:port" or a bare port -> localhost); ValueError if bad."""
    parts = value.split("/")
    if len(parts) != 2:
        raise ValueError(f"invalid endpoint {value!r} (expected <endpoint-id>/<addr>)")
    endpoint_id, addr = parts[0].strip(), parts[1].strip()
    if not _ENDPOINT_ID.fullmatch(endpoint_id):
        raise ValueError(
            f"invalid endpoint id {endpoint_id!r} in {value!r} "
            "(1-128 characters of A-Z a-z 0-9 . _ -)"
        )
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


def _http_url(value: str) -> str:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"invalid URL {value!r} (must be http://host[:port] or https://...)")
    try:
        _ = parsed.port
    except ValueError:
        raise ValueError(f"invalid URL {value!r}: bad port") from None
    return value


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


class AgentAuthConfig(_Model):
    """``auth`` (agent side)."""

    api_key: str = Field("", description="API key (JWT) sent as 'Authorization: Bearer <key>'.")


class ForwarderConfig(_Model):
    """``forwarder``: requests to the local services."""

    timeout: Duration = Field(
        10.0, description="Timeout per request to the local service; 504 when exceeded."
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
        description="Endpoints to register, each '<endpoint-id>/<addr>' (addr: host:port or port).",
    )
    server: AgentServerSection = Field(default_factory=AgentServerSection)
    auth: AgentAuthConfig = Field(default_factory=AgentAuthConfig)
    forwarder: ForwarderConfig = Field(default_factory=ForwarderConfig)
    admin: AgentAdminConfig = Field(default_factory=AgentAdminConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    def parsed_endpoints(self) -> list[EndpointSpec]:
        """The endpoints as :class:`EndpointSpec` values."""
        return [parse_endpoint(e) for e in self.endpoints]


# ---------------------------------------------------------------------------
# Introspection
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Leaf:
    key: str  # dotted path, e.g. "proxy.bind_addr"
    path: tuple[str, ...]
    kind: str  # "str", "int", "bool", "list", "duration"
    default: Any
    description: str


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _leaves(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[_Leaf]:
    out: list[_Leaf] = []
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        if _is_model(info.annotation):
            out.extend(_leaves(cast("type[BaseModel]", info.annotation), path))
            continue
        if any(m is _DURATION for m in info.metadata):
            kind = "duration"
        elif info.annotation is bool:
            kind = "bool"
        elif info.annotation is int:
            kind = "int"
        elif getattr(info.annotation, "__origin__", None) is list:
            kind = "list"
        else:
            kind = "str"
        default = info.get_default(call_default_factory=True)
        out.append(_Leaf(".".join(path), path, kind, default, info.description or ""))
    return out


def _format_default(leaf: _Leaf) -> str:
    d = leaf.default
    if leaf.kind == "duration":
        return format_duration(float(d))
    if leaf.kind == "bool":
        return "true" if d else "false"
    if leaf.kind == "list":
        return ",".join(d) if d else "[]"
    if d == "":
        return '""'
    return str(d)


def describe(model: type[BaseModel]) -> list[tuple[str, str, str]]:
    """List every leaf key of ``model`` as (dotted key, default, description), for docs."""
    return [(leaf.key, _format_default(leaf), leaf.description) for leaf in _leaves(model)]


def param_name(key: str) -> str:
    """The click parameter name used for a dotted key ("proxy.bind_addr" -> "proxy__bind_addr")."""
    return key.replace(".", "__")


def flag_name(key: str) -> str:
    """The command-line flag for a dotted key ("proxy.bind_addr" -> "--proxy.bind-addr")."""
    return "--" + key.replace("_", "-")


# ---------------------------------------------------------------------------
# click integration
# ---------------------------------------------------------------------------

CONFIG_PATH_PARAM = "config__path"
CONFIG_EXPAND_ENV_PARAM = "config__expand_env"


def config_options(model: type[BaseModel]) -> Callable[[F], F]:
    """Click decorator adding ``--config.path``, ``--config.expand-env`` and one flag per key.

    Flags default to None (not given); bools take an optional value (``--x``, ``--x false``),
    lists take comma-separated values and may be repeated. Pass the command's kwargs to
    :func:`load_config`.
    """
    leaves = _leaves(model)

    def decorator(f: F) -> F:
        options: list[Callable[[F], F]] = [
            click.option(
                "--config.path",
                CONFIG_PATH_PARAM,
                type=str,
                default=None,
                metavar="PATH",
                help="YAML config file. Flags given explicitly override values in the file.",
            ),
            click.option(
                "--config.expand-env",
                CONFIG_EXPAND_ENV_PARAM,
                type=str,
                is_flag=False,
                flag_value="true",
                default=None,
                metavar="[BOOL]",
                help="Expand $VAR, ${VAR}, ${VAR:default} in the config file. (default: false)",
            ),
        ]
        for leaf in leaves:
            help_text = f"{leaf.description} (default: {_format_default(leaf)})"
            kwargs: dict[str, Any] = {"type": str, "default": None, "help": help_text}
            if leaf.kind == "bool":
                kwargs.update(is_flag=False, flag_value="true", metavar="[BOOL]")
            elif leaf.kind == "list":
                kwargs.update(multiple=True, metavar="LIST")
                kwargs["help"] = (
                    f"{leaf.description} Comma-separated; may be repeated."
                    f" (default: {_format_default(leaf)})"
                )
            elif leaf.kind == "duration":
                kwargs["metavar"] = "DURATION"
            elif leaf.kind == "int":
                kwargs["metavar"] = "INT"
            else:
                kwargs["metavar"] = "ADDR" if leaf.key.endswith("_addr") else "TEXT"
            options.append(click.option(flag_name(leaf.key), param_name(leaf.key), **kwargs))
        for opt in reversed(options):
            f = opt(f)
        return f

    return decorator


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f", ""}


def _parse_bool(value: object, *, key: str) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ConfigError(f"{key}: invalid boolean {value!r} (use true or false)")


def _format_loc(loc: Sequence[int | str]) -> str:
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key = f"{key}.{part}" if key else part
    return key


def _format_error(err: Mapping[str, Any]) -> str:
    key = _format_loc(err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown key {key!r}"
    if err["type"] == "value_error":
        msg = str(err.get("ctx", {}).get("error", err["msg"]))
    else:
        msg = str(err["msg"])
        inp = err.get("input")
        if not isinstance(inp, Mapping | list):
            msg += f" (got {inp!r})"
    if not key or msg.startswith(key):
        return msg
    return f"{key}: {msg}"


def load_config_dict(model: type[M], data: Mapping[str, Any]) -> M:
    """Validate a nested dict against ``model``; raises :class:`ConfigError` naming the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping of keys, got {type(data).__name__}")
    try:
        cfg = model.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError("; ".join(_format_error(err) for err in e.errors())) from None
    if isinstance(cfg, AgentConfig) and not cfg.endpoints:
        raise ConfigError("endpoints: at least one endpoint is required (e.g. my-endpoint/4000)")
    return cfg


def _read_yaml(path: str, expand: bool) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"config.path: cannot read {path!r}: {reason}") from None
    if expand:
        text = expand_env(text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"config.path: invalid YAML in {path!r}: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config.path: {path!r} must contain a mapping of keys, got {type(data).__name__}"
        )
    return data


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            section = ".".join(path[: i + 1])
            raise ConfigError(f"{section}: expected a mapping of keys, got {child!r}")
        node = child
    node[path[-1]] = value


def load_config(model: type[M], click_params: Mapping[str, Any]) -> M:
    """Build ``model`` from defaults, the YAML file (``--config.path``) and explicit flags.

    ``click_params`` is the kwargs dict of a command decorated with :func:`config_options`;
    keys it does not know are ignored. Flags override the file.
    """
    path = click_params.get(CONFIG_PATH_PARAM)
    expand_raw = click_params.get(CONFIG_EXPAND_ENV_PARAM)
    expand = False if expand_raw is None else _parse_bool(expand_raw, key="config.expand_env")
    data: dict[str, Any] = _read_yaml(path, expand) if path else {}
    for leaf in _leaves(model):
        value = click_params.get(param_name(leaf.key))
        if value is None:
            continue
        if leaf.kind == "list":
            if isinstance(value, str):
                value = (value,)
            if not value:
                continue
            value = _split_list(list(value))
        _set_path(data, leaf.path, value)
    return load_config_dict(model, data)
