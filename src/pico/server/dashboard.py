"""The admin dashboard: one self-contained page (`dashboard.html`, inline CSS and JS, no
external assets) served at `/` on the admin port.

The page polls the status API itself with relative URLs; this module only serves it, with a
Content-Security-Policy that allows exactly its own inline script and style, so an endpoint
name that slipped into the page as markup could still not run.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class DashboardPage:
    """The page body and the headers it is served with."""

    body: bytes
    headers: dict[str, str]


def _csp(html: str) -> str:
    """A policy allowing the page's own inline blocks (by hash) and same-origin fetches."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, content in _INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(content.encode()).digest()).decode()
        hashes[tag].append(f"'sha256-{digest}'")
    return "; ".join(
        [
            "default-src 'none'",
            "script-src " + " ".join(hashes["script"]),
            "style-src " + " ".join(hashes["style"]),
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


@functools.cache
def load_page() -> DashboardPage:
    """Read the page from the package once."""
    html = resources.files("pico.server").joinpath("dashboard.html").read_text("utf-8")
    return DashboardPage(
        body=html.encode(),
        headers={
            "Content-Type": "text/html; charset=utf-8",
            "Content-Security-Policy": _csp(html),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            # The page is small and changes only with an upgrade: always revalidate.
            "Cache-Control": "no-cache",
        },
    )


async def serve_dashboard(request: web.Request) -> web.StreamResponse:
    """`GET /`: the dashboard page."""
    page = load_page()
    return web.Response(body=page.body, headers=page.headers)
