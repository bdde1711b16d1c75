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

from pico.config.flags import (
    CONFIG_EXPAND_ENV_PARAM,
    CONFIG_PATH_PARAM,
    config_options,
    describe,
    flag_name,
    param_name,
)
from pico.config.loader import load_config, load_config_dict
from pico.config.schema import (
    AccessLogConfig,
    AgentConfig,
    EndpointSpec,
    ForwardConfig,
    HeaderFilter,
    ListenerConfig,
    ServerConfig,
    check_endpoint_id,
    parse_endpoint,
    parse_listener_addr,
)
from pico.config.values import (
    ConfigError,
    expand_env,
    format_duration,
    parse_duration,
    parse_host_port,
)

__all__ = [
    "CONFIG_EXPAND_ENV_PARAM",
    "CONFIG_PATH_PARAM",
    "AccessLogConfig",
    "AgentConfig",
    "ConfigError",
    "EndpointSpec",
    "ForwardConfig",
    "HeaderFilter",
    "ListenerConfig",
    "ServerConfig",
    "check_endpoint_id",
    "config_options",
    "describe",
    "expand_env",
    "flag_name",
    "format_duration",
    "load_config",
    "load_config_dict",
    "param_name",
    "parse_duration",
    "parse_endpoint",
    "parse_host_port",
    "parse_listener_addr",
]
