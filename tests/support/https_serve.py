"""The sample service over TLS: `python -m tests.support.https_serve HOST PORT CERT_KEY_PEM`."""

from __future__ import annotations

import ssl
import sys

from aiohttp import web

from tests.support.services import sample_app

if __name__ == "__main__":
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(sys.argv[3])
    web.run_app(
        sample_app("https-service"),
        host=sys.argv[1],
        port=int(sys.argv[2]),
        ssl_context=context,
        print=None,
        access_log=None,
    )
