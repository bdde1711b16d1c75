"""Run the sample service as a process: `python -m tests.support.serve HOST PORT`."""

from __future__ import annotations

import sys

from aiohttp import web

from tests.support.services import sample_app

if __name__ == "__main__":
    web.run_app(sample_app(), host=sys.argv[1], port=int(sys.argv[2]), print=None, access_log=None)
