"""A Flask (WSGI) app on a Pico endpoint, its requests on a pool of threads.

    pip install 'pico[sdk]' flask
    pico server &
    python examples/flask_app.py                    # registers endpoint "legacy"
    curl http://localhost:8000/ -H "x-pico-endpoint: legacy"

PICO_URL (default http://localhost:8001) is the node's upstream port, PICO_API_KEY its token.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, request

import pico.sdk

app = Flask(__name__)


@app.get("/")
def hello() -> Any:
    return {"hello": "flask", "client": request.remote_addr}


if __name__ == "__main__":
    pico.sdk.run(
        app,
        "legacy",
        url=os.environ.get("PICO_URL", "http://localhost:8001"),
        api_key=os.environ.get("PICO_API_KEY", ""),
        interface="wsgi",
    )
