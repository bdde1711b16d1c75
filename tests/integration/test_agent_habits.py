"""What the agent does when pointed at the wrong place or given a config that cannot work."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from aiohttp import web

from pico.agent.agent import AgentRejected
from pico.config import AgentConfig, ConfigError, load_config_dict
from tests.support.cluster import Harness, agent_config, proxy_url, wait_for
from tests.support.procs import REPO
from tests.support.services import sample_app


async def test_a_404_is_retried_and_logged_once_with_a_hint(
    h: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    hits: list[str] = []

    async def not_found(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"error": "not found"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", not_found)
    port = await h.service(app)
    node = await h.node()
    config = agent_config(node, ["ep/127.0.0.1:1"], server={"url": f"http://127.0.0.1:{port}"})
    running = await h.agent(node, ["ep/127.0.0.1:1"], server=config.server.model_dump())
    # A reverse proxy answering 404 for a moment must not stop the agent: it tries again.
    await wait_for(lambda: len(hits) >= 3, timeout=20, what="three attempts")
    assert not running.task.done()
    errors = [
        json.loads(line)
        for line in capsys.readouterr().err.splitlines()
        if line.startswith("{") and '"subsystem":"agent"' in line and '"level":"error"' in line
    ]
    assert len(errors) == 1, errors
    assert errors[0]["hint"] == "is --server.url the upstream port (default 8001)?"


async def test_an_agent_pointed_at_the_proxy_port_says_which_port_to_use(h: Harness) -> None:
    node = await h.node()
    port = await h.service(sample_app())
    running = await h.agent(node, [f"ep/127.0.0.1:{port}"], server={"url": proxy_url(node)})
    with pytest.raises(AgentRejected) as err:
        await asyncio.wait_for(running.task, 10)
    assert "400 missing endpoint id" in str(err.value)
    assert "is --server.url the upstream port (default 8001)?" in str(err.value)


def test_duplicate_endpoint_ids_are_refused_naming_the_duplicate() -> None:
    with pytest.raises(ConfigError, match=r"endpoint id 'Dup' is given twice"):
        load_config_dict(AgentConfig, {"endpoints": ["dup/7000", "Dup/7001"]})
    cli = subprocess.run(
        [sys.executable, "-m", "pico", "agent", "--endpoints", "dup/7000,dup/7001"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert cli.returncode == 1
    assert "endpoint id 'dup' is given twice ('dup/7000' and 'dup/7001')" in cli.stderr


def test_forwarder_timeout_help_says_what_it_bounds() -> None:
    cli = subprocess.run(
        [sys.executable, "-m", "pico", "agent", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    text = " ".join(cli.stdout.split())
    assert "How long the agent waits to connect to the local service" in text
    assert "it does not bound the response" in text
