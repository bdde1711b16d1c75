"""Flags from the schema: one click option per leaf key, named after its dotted path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import click
from pydantic import BaseModel

from pico.config.schema import _DURATION, _YAML_ONLY
from pico.config.values import format_duration

F = TypeVar("F", bound=Callable[..., Any])


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
        if any(m is _YAML_ONLY for m in info.metadata):
            continue
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
