"""`promtool check metrics` on the real /metrics output of a node and of an agent.

promtool (Debian package `prometheus`, installed by .ci/run) lints the exposition format and
the naming conventions (counters end in `_total`, base units, help text, ...). A missing
promtool is a failure, not a skip: CI always has it.
"""

from __future__ import annotations

import shutil
import subprocess

import aiohttp
import pytest

from tests.support.cluster import Harness, admin_url, proxy_url
from tests.support.services import sample_app

pytestmark = pytest.mark.e2e


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: install it with `apt-get install -y prometheus` "
            "(.ci/run does this in CI)",
            pytrace=False,
        )
    return path


def check_metrics(text: str, what: str) -> None:
    """Fail with promtool's own words if it reports anything at all."""
    assert text.strip(), f"{what}: empty /metrics"
    result = subprocess.run(
        [promtool(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and not line.lower().startswith(("success", "checking"))
    ]
    assert result.returncode == 0 and not output, (
        f"promtool check metrics on {what} exited {result.returncode}:\n" + "\n".join(output)
    )


async def test_node_and_agent_metrics_pass_promtool(h: Harness) -> None:
    promtool()
    node = await h.node()
    port = await h.service(sample_app())
    running = await h.agent(node, [f"lint/127.0.0.1:{port}", f"lint-2/127.0.0.1:{port}"])
    agent_host, agent_port = await running.agent.start_admin()
    await h.tunnel_up(node, "lint")
    await h.tunnel_up(node, "lint-2")

    async with aiohttp.ClientSession() as http:
        # Traffic that fills in every label-dependent series: several statuses and methods,
        # bodies both ways, an unknown endpoint.
        for endpoint, method, path in [
            ("lint", "GET", "/"),
            ("lint", "POST", "/echo"),
            ("lint-2", "PUT", "/echo"),
            ("lint", "GET", "/missing"),
            ("nobody", "GET", "/"),
        ]:
            async with http.request(
                method,
                proxy_url(node) + path,
                data=b"body" * 100 if method != "GET" else None,
                headers={"x-pico-endpoint": endpoint},
            ) as resp:
                await resp.read()

        async with http.get(admin_url(node) + "/metrics") as resp:
            assert resp.status == 200
            node_text = await resp.text()
        async with http.get(f"http://{agent_host}:{agent_port}/metrics") as resp:
            assert resp.status == 200
            agent_text = await resp.text()

    assert 'pico_proxy_requests_total{method="POST"' in node_text
    assert "pico_proxy_request_latency_seconds_bucket" in node_text
    assert 'endpoint="lint-2"' in agent_text
    check_metrics(node_text, "node /metrics")
    check_metrics(agent_text, "agent /metrics")
