"""The modules that `PICO_COMPILE=1` compiles with mypyc, and whether the running ones are.

Every module a request or a tunnel frame passes through, on the node and in the agent. They
stay plain Python (the tests run both ways): compiled, the same code runs as C extensions that
Python imports in place of the .py files. A module listed here must keep to mypyc's rules: its
classes are not subclassed by interpreted code, and nothing patches its functions at run time.

Not (yet) listed, and why (tried 2026-12-02): `pico.forward` (ForwardError subclasses
ConnectionError, which mypyc cannot compile), `pico.mux.events` (mypyc's dataclasses reject the
memoryview field), `pico.http.states` (TransitionError subclasses RuntimeError). With
`pico.agent.agent`, `pico.agent.dialer`, `pico.mux.handshake`, `pico.http.settings` and
`pico.server.tcp` also compiled, the unit tests pass but some integration tests fail (a
BadRequest raised in an httptools callback arrives as "User callback error"; agents that stop
are not removed at once): not investigated further. Two rules learnt: a compiled function
checks every value against its declared type (a test double must satisfy a Protocol, not
stand in for a class), and one `except ... as exc` name bound to two exception types fails.
"""

from __future__ import annotations

import importlib
from importlib.machinery import EXTENSION_SUFFIXES

MODULES = (
    "pico.agent.service",
    "pico.mux.acks",
    "pico.mux.buffers",
    "pico.mux.frame",
    "pico.mux.session",
    "pico.mux.splice",
    "pico.mux.stream",
    "pico.mux.tunnel",
    "pico.mux.websocket",
    "pico.http.exchange",
    "pico.http.framing",
    "pico.http.head",
    "pico.http.proxy",
    "pico.http.request",
    "pico.http.retry",
    "pico.http.response",
    "pico.http.timer",
    "pico.server.forward",
    "pico.server.history",
    "pico.server.metrics",
    "pico.server.proxy",
    "pico.server.upstream",
)


def compiled_modules() -> list[str]:
    """The modules of MODULES that were imported from a C extension."""
    found = []
    for name in MODULES:
        path = getattr(importlib.import_module(name), "__file__", None) or ""
        if path.endswith(tuple(EXTENSION_SUFFIXES)):
            found.append(name)
    return found


def build_mode() -> str:
    """`compiled` (all of MODULES are C extensions), `pure` (none is), or `mixed`."""
    n = len(compiled_modules())
    return "compiled" if n == len(MODULES) else "pure" if n == 0 else "mixed"
