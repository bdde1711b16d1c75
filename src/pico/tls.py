"""TLS contexts from configuration, for every port and every client of a port.

A server context serves one certificate chain, speaks TLS 1.2 or later, offers only
HTTP/1.1 by ALPN (Pico speaks nothing else) and, with `client_cas`, requires a client
certificate signed by one of them (mTLS). A client context verifies the server against
`root_ca` (the system's roots when empty) and may present a certificate of its own.

Contexts are built once at start-up from files the config validated; `check_*` are the
validators, so a bad file is reported against its key before anything listens.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

_ALPN = ["http/1.1"]


def server_context(cert: str, key: str, client_cas: str = "") -> ssl.SSLContext:
    """A server context for `cert` (PEM chain) and `key`; mTLS when `client_cas` is set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(_ALPN)
    if client_cas:
        context.load_verify_locations(cafile=client_cas)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    root_ca: str = "", cert: str = "", key: str = "", *, insecure_skip_verify: bool = False
) -> ssl.SSLContext:
    """A client context trusting `root_ca` (or the system roots), presenting `cert` if set."""
    context = ssl.create_default_context(cafile=root_ca or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(_ALPN)
    if insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert:
        context.load_cert_chain(cert, key or None)
    return context


def check_pair(cert: str, key: str) -> None:
    """ValueError unless `cert` and `key` are both empty or load as a matching pair."""
    if bool(cert) != bool(key):
        raise ValueError("cert and key must be set together")
    if cert:
        for path in (cert, key):
            if not os.path.isfile(path):
                raise ValueError(f"no such file: {path!r}")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            reason = _reason(exc)
            raise ValueError(f"cannot load cert {cert!r} with key {key!r}: {reason}") from None


def check_cas(path: str, name: str) -> None:
    """ValueError unless `path` is empty or a PEM bundle of CA certificates."""
    if not path:
        return
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no such file: {path!r}")
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"{name}: cannot load {path!r}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)


@dataclass(frozen=True, slots=True)
class PeerTls:
    """How a node connects to another node's TLS port: `context`, and the name the peer's
    certificate must be valid for (`server_name`, else the host the peer advertises)."""

    context: ssl.SSLContext
    server_name: str = ""

    def hostname(self, host: str) -> str:
        """The name to verify the certificate of a peer reached at `host` against."""
        return self.server_name or host
