"""Scalar values of the configuration: durations, host:port addresses, env expansion.

Also the one exception type, ConfigError, whose message names the offending key.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from typing import TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


class ConfigError(Exception):
    """A configuration problem; the message names the offending key."""


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


_HOST = re.compile(r"[A-Za-z0-9._-]*")


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


def is_member_addr(value: str) -> bool:
    """True for a plain `host:port` with a host and a port 1-65535: what a node may advertise
    (no path, query, fragment, userinfo or spaces: the address goes into URLs)."""
    if value != value.strip():
        return False
    try:
        host, port = _split_host_port(value)
    except ValueError:
        return False
    return bool(host) and 0 < port


def parse_host_port(value: str, *, key: str) -> tuple[str, int]:
    """Parse "host:port" (":8000" -> ("", 8000), "[::1]:8000" -> ("::1", 8000)).

    Raises :class:`ConfigError` naming ``key`` if the address is malformed.
    """
    try:
        return _split_host_port(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
