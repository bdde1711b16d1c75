"""The access log: one structured line per proxied request (subsystem `proxy.access`).

Header lists pass through an allow list or a block list (case-insensitive); credentials
(`Authorization`, `x-pico-authorization`, `Proxy-Authorization`, `Cookie`, `Set-Cookie`) are
left out unless an allow list names them. 5xx responses are logged at warn at
least. When the line's level is filtered out, nothing is built (no cost per request).
"""

from __future__ import annotations

from collections.abc import Sequence

from pico import log
from pico.config import AccessLogConfig, HeaderFilter
from pico.http.settings import RequestRecord

_RANK = {"debug": 0, "info": 1, "warn": 2, "error": 3}
# Credentials are never logged unless an allow list names them: a block list that forgets
# one (or none at all) must not put tokens and session cookies in the logs.
_SECRETS = frozenset(
    {b"authorization", b"x-pico-authorization", b"proxy-authorization", b"cookie", b"set-cookie"}
)


class _Filter:
    __slots__ = ("allow", "block")

    def __init__(self, config: HeaderFilter) -> None:
        self.allow = frozenset(h.lower().encode("latin-1") for h in config.allow_list)
        block = frozenset(h.lower().encode("latin-1") for h in config.block_list)
        self.block = block if self.allow else block | _SECRETS

    def apply(self, headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in headers:
            lname = name.lower()
            if (self.allow and lname not in self.allow) or lname in self.block:
                continue
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            out[key] = f"{out[key]}, {text}" if key in out else text
        return out


class AccessLog:
    """An observer of finished requests that writes the access log."""

    def __init__(self, config: AccessLogConfig) -> None:
        self.level = config.level
        self.log = log.get_logger("proxy.access")
        self.request_headers = _Filter(config.request_headers)
        self.response_headers = _Filter(config.response_headers)
        self.error_level = "warn" if _RANK[self.level] < _RANK["warn"] else self.level

    def __call__(self, record: RequestRecord) -> None:
        level = self.error_level if record.status >= 500 else self.level
        if not self.log.enabled(level):
            return
        self.log.log(
            level,
            "request",
            method=record.method,
            host=record.host,
            path=record.path,
            status=record.status,
            duration_ms=round(record.duration * 1000, 3),
            bytes_in=record.bytes_in,
            bytes_out=record.bytes_out,
            endpoint=record.endpoint,
            client_ip=record.client_ip,
            upstream=record.upstream,
            upstream_kind="node" if record.remote else ("tunnel" if record.upstream else ""),
            forwarded=record.forwarded,
            request_headers=self.request_headers.apply(record.request_headers),
            response_headers=self.response_headers.apply(record.response_headers),
        )
