"""Loading: defaults, then the YAML file (optionally env-expanded), then explicit flags."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pico.config.flags import CONFIG_EXPAND_ENV_PARAM, CONFIG_PATH_PARAM, _leaves, param_name
from pico.config.schema import AgentConfig, _split_list
from pico.config.values import ConfigError, expand_env

M = TypeVar("M", bound=BaseModel)


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
    if isinstance(cfg, AgentConfig) and not cfg.endpoints and not cfg.listeners:
        raise ConfigError(
            "endpoints: at least one endpoint is required (e.g. my-endpoint/4000, "
            "or listeners in the config file)"
        )
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


def load_config(
    model: type[M],
    click_params: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
) -> M:
    """Build ``model`` from defaults, the YAML file (``--config.path``) and explicit flags.

    ``click_params`` is the kwargs dict of a command decorated with :func:`config_options`;
    keys it does not know are ignored. Flags override the file. ``overrides`` replace
    top-level keys of the file (``pico agent tcp`` replaces its ``listeners``).
    """
    path = click_params.get(CONFIG_PATH_PARAM)
    expand_raw = click_params.get(CONFIG_EXPAND_ENV_PARAM)
    expand = False if expand_raw is None else _parse_bool(expand_raw, key="config.expand_env")
    data: dict[str, Any] = _read_yaml(path, expand) if path else {}
    data.update(overrides or {})
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
