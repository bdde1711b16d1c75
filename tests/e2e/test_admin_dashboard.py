"""End to end: the admin dashboard in a real headless Chromium, against an in-process 3-node
cluster with live traffic. Chromium is driven over the DevTools protocol (aiohttp's WebSocket
client), so the page runs in real time on the test's event loop while the cluster keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pico.server.node import Node
from tests.support.cluster import Harness, admin_url, proxy_url, wait_for
from tests.support.services import sample_app

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[2] / "bench" / "results" / "dashboard.png"
ENDPOINT = "shop-api"
# An endpoint name is whatever a client puts in X-Pico-Endpoint: the page must show it as text.
HOSTILE = '<img src=x onerror="window.pwned=1">'
NO_RATE = "\u2013"  # what the page shows until it has two samples to compute a rate from


class Chromium:
    """One headless Chromium page, driven over the DevTools protocol; collects console errors."""

    def __init__(self, proc: asyncio.subprocess.Process, ws: aiohttp.ClientWebSocketResponse):
        self.proc = proc
        self.ws = ws
        self.session_id = ""
        self.console_errors: list[str] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, profile: Path, log: Path) -> AsyncIterator[Chromium]:
        """Start Chromium with a fresh profile and open one blank page; stops it on exit."""
        assert CHROMIUM is not None
        with log.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
                "about:blank",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # its helper processes share its group: killed together
            )
        try:
            port_file = profile / "DevToolsActivePort"
            await wait_for(
                lambda: proc.returncode is None and len(_lines(port_file)) >= 2,
                timeout=20,
                what=f"chromium DevTools port (log: {log})",
            )
            port, path = _lines(port_file)[:2]
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
                browser = cls(proc, ws)
                try:
                    await browser._open_page()
                    yield browser
                finally:
                    await browser._close()
        finally:
            await _stop(proc)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command to the page (or the browser before a page is attached)."""
        msg_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if self.session_id:
            message["sessionId"] = self.session_id
        await self.ws.send_str(json.dumps(message))
        return await asyncio.wait_for(future, 15)

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        reply = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise AssertionError(f"page script failed: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def screenshot(self) -> bytes:
        """The page as a PNG."""
        reply = await self.call("Page.captureScreenshot", format="png")
        return base64.b64decode(reply["data"])

    async def _open_page(self) -> None:
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        self.session_id = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            await self.call(f"{domain}.enable")
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            future = self._pending.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                if "error" in data:
                    future.set_exception(AssertionError(f"DevTools error: {data['error']}"))
                else:
                    future.set_result(data.get("result", {}))
            elif "method" in data:
                self._on_event(data["method"], data.get("params", {}))

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            self.console_errors.append(f"uncaught: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = [a.get("value", a.get("description", "")) for a in params.get("args", [])]
            self.console_errors.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.console_errors.append(f"{entry.get('source')}: {entry.get('text')}")

    async def _close(self) -> None:
        self.session_id = ""
        with contextlib.suppress(Exception):
            await self.call("Browser.close")
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.ws.close()


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Wait for Chromium to exit after Browser.close; kill its process group if it does not."""
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


# What the person looking at the page reads: every table as rows of {column header: text}.
# null until the page has loaded.
SNAPSHOT_JS = """(() => {
  if (!document.getElementById("endpoints")) return null;
  const table = (id) => {
    const t = document.getElementById(id);
    const heads = [...t.tHead.rows[0].cells].map((c) => c.innerText.trim());
    return [...t.tBodies[0].rows].filter((r) => !r.classList.contains("empty")).map((r) =>
      Object.fromEntries([...r.cells].map((c, i) => [heads[i], c.innerText.trim()])));
  };
  const banner = document.getElementById("banner");
  return {
    nodes: table("nodes"),
    endpoints: table("endpoints"),
    banner: banner.hidden ? "" : banner.innerText,
    refreshed: document.getElementById("refresh").innerText,
    injected: document.querySelectorAll("main img, main script").length,
    pwned: window.pwned === 1,
    charts: Object.fromEntries(["rate", "latency", "errors"].map((name) =>
      [name, Number(document.getElementById(`chart-${name}`).dataset.drawn || 0)])),
    scopes: [...document.getElementById("scope").options].map((o) => o.value),
  };
})()"""

# Show one endpoint's charts, as a person picking it in the list does.
PICK_SCOPE_JS = """((name) => {
  const select = document.getElementById("scope");
  select.value = name;
  select.dispatchEvent(new Event("change"));
  return Number(document.getElementById("chart-rate").dataset.drawn || 0);
})(%s)"""


def gossip_addr(node: Node) -> str:
    assert node.addrs is not None
    host, port = node.addrs.gossip
    return f"{host}:{port}"


async def three_node_cluster(h: Harness) -> list[Node]:
    first = await h.node()
    nodes = [first, *[await h.node(cluster={"join": [gossip_addr(first)]}) for _ in range(2)]]
    for node in nodes:
        await wait_for(
            lambda node=node: (  # type: ignore[misc]
                len(node.cluster.remotes) == 2
                and all(r.status == "active" for r in node.cluster.remotes.values())
            ),
            what=f"{node.node_id} sees 2 active peers",
        )
    return nodes


async def send_traffic(http: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> int:
    """GET `url` for ENDPOINT until `stop` is set; returns how many requests succeeded."""
    sent = 0
    while not stop.is_set():
        async with http.get(url, headers={"x-pico-endpoint": ENDPOINT}) as resp:
            assert resp.status == 200
            sent += 1
        # Pace it at ~50 req/s: a steady rate that leaves the event loop (the whole cluster
        # and its admin API) free to answer the page.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)
    return sent


def save_screenshot(png: bytes) -> None:
    """For the engineer's notes (bench/results is not committed)."""
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.write_bytes(png)


def rate(row: dict[str, str]) -> float:
    value = row["Requests/s"]
    return 0.0 if value == NO_RATE else float(value)


async def test_dashboard_shows_nodes_endpoints_upstreams_and_request_rate(
    h: Harness, tmp_path: Path
) -> None:
    if CHROMIUM is None:
        pytest.fail("chromium is required for the dashboard test: apt-get install chromium")
    a, b, c = await three_node_cluster(h)
    port = await h.service(sample_app())
    await h.agent(a, [f"{ENDPOINT}/127.0.0.1:{port}"])
    await h.tunnel_up(a, ENDPOINT)
    for node in (b, c):
        await wait_for(
            lambda node=node: node.cluster.remotes[a.node_id].endpoints.get(ENDPOINT) == 1,  # type: ignore[misc]
            what=f"{ENDPOINT} gossiped to {node.node_id}",
        )
    upstream_addr = a.registry.endpoints()[ENDPOINT][0].addr
    node_ids = sorted(n.node_id for n in (a, b, c))

    async with aiohttp.ClientSession() as http, asyncio.TaskGroup() as tasks:
        # The proxy refuses such a name (400), so put it in a's stats directly: the page must
        # still show any name as text (defence in depth against markup from the API).
        async with http.get(proxy_url(a), headers={"x-pico-endpoint": HOSTILE}) as resp:
            assert resp.status == 400
        a.metrics.proxy.by_endpoint[HOSTILE] = [1, 1]
        stop = asyncio.Event()
        # Through c, so every request is forwarded to a (counted once, by the holder).
        traffic = tasks.create_task(send_traffic(http, proxy_url(c) + "/", stop))
        try:
            await wait_for(lambda: a.metrics.proxy.by_endpoint.get(ENDPOINT, [0])[0] >= 10)
            async with Chromium.launch(tmp_path / "profile", tmp_path / "chromium.log") as page:
                # Served by b, which holds nothing: a's stats come through ?forward.
                await page.call("Page.navigate", url=admin_url(b) + "/")
                view: dict[str, Any] = {}

                async def rate_shown() -> bool:
                    snapshot = await page.evaluate(SNAPSHOT_JS)
                    if snapshot is None:
                        return False
                    view.update(snapshot)
                    rows = [e for e in view["endpoints"] if e["Endpoint"] == ENDPOINT]
                    return bool(rows) and rate(rows[0]) > 0

                await wait_for(rate_shown, timeout=20, what=f"a request rate for {ENDPOINT}")

                async def charts_drawn() -> bool:
                    view.update(await page.evaluate(SNAPSHOT_JS))
                    return view["charts"]["rate"] > 0 and view["charts"]["latency"] > 0

                await wait_for(charts_drawn, timeout=20, what="the charts drawn from history")
                endpoint_points = await page.evaluate(PICK_SCOPE_JS % json.dumps(ENDPOINT))
                png = await page.screenshot()
                console_errors = page.console_errors
        finally:
            stop.set()
    assert traffic.result() > 0
    await asyncio.to_thread(save_screenshot, png)

    assert [n["Node"] for n in view["nodes"]] == node_ids
    assert {n["Status"] for n in view["nodes"]} == {"active"}
    by_node = {n["Node"]: n for n in view["nodes"]}
    assert by_node[a.node_id]["Endpoints"] == "1"
    assert by_node[a.node_id]["Upstreams"] == "1"
    assert by_node[b.node_id]["Endpoints"] == "0"
    assert a.addrs is not None
    assert by_node[a.node_id]["Proxy address"].endswith(f":{a.addrs.proxy[1]}")

    endpoints = {e["Endpoint"]: e for e in view["endpoints"]}
    shop = endpoints[ENDPOINT]
    assert shop["Nodes"] == a.node_id
    assert upstream_addr in shop["Upstreams"]
    assert int(shop["Requests"].replace(",", "")) > 0
    assert shop["Errors"] == "0"

    # The hostile name is shown as text, and no element was made from it.
    assert endpoints[HOSTILE]["Upstreams"] == "no upstreams"
    assert view["injected"] == 0
    assert not view["pwned"]

    assert view["banner"] == ""
    assert view["refreshed"].startswith("Last refresh")
    assert console_errors == []

    # Charts: traffic sent before the page opened is drawn (the nodes keep the history), for
    # the cluster and for the endpoint; no 5xx, so no error points; c took the requests.
    assert view["charts"]["rate"] >= 1 and view["charts"]["latency"] >= 1
    assert view["charts"]["errors"] == 0
    assert ENDPOINT in view["scopes"]
    assert endpoint_points >= 1
    assert float(by_node[c.node_id]["Requests/s"]) > 0
    assert by_node[b.node_id]["Requests/s"] in ("0.0", NO_RATE)


async def test_the_dashboard_of_an_admin_port_with_auth_takes_its_token_from_the_fragment(
    h: Harness, tmp_path: Path
) -> None:
    if CHROMIUM is None:
        pytest.fail("chromium is required for the dashboard test: apt-get install chromium")
    import time

    import jwt

    secret = "dashboard-secret-" + "d" * 48
    node = await h.node(admin={"auth": {"hmac_secret_key": secret}})
    token = jwt.encode({"exp": int(time.time()) + 300}, secret, algorithm="HS256")
    async with Chromium.launch(tmp_path / "profile", tmp_path / "chromium.log") as page:
        await page.call("Page.navigate", url=admin_url(node) + "/")
        view: dict[str, Any] = {}

        async def shown(what: str) -> bool:
            snapshot = await page.evaluate(SNAPSHOT_JS)
            if snapshot is None:
                return False
            view.update(snapshot)
            return what in (view["banner"] if what == "token" else str(view["nodes"]))

        # Without a token, the page says how to give one.
        await wait_for(lambda: shown("token"), timeout=20, what="the banner asking for a token")
        await page.call("Page.navigate", url=admin_url(node) + "/#token=" + token)
        await wait_for(lambda: shown(node.node_id), timeout=20, what="the node listed")
        assert await page.evaluate("location.hash") == ""  # out of the address bar at once
