"""Checks of the Grafana dashboards in deploy/grafana/dashboards against a real node's /metrics.

A two-node in-process cluster is started once for the module and one agent is connected to
the first node; requests are sent through both nodes (so the first forwards locally and the
second forwards remotely) and both nodes' /metrics are scraped. Every PromQL expression in
every dashboard must then refer only to metric families, and label names, that the node
really exports, with counters used through rate() and histograms through their `_bucket`
series.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from pico.server.node import Node
from tests.support.cluster import Harness, admin_url, proxy_url, wait_for
from tests.support.services import sample_app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
PROVISIONING = DEPLOY / "grafana" / "provisioning" / "dashboards" / "pico.yaml"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DATASOURCE_UID = "prometheus"

DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))

# Panel titles each dashboard must have, by row (spec §12.4 plus the newer panels).
EXPECTED: dict[str, dict[str, list[str]]] = {
    "pico-cluster.json": {
        "Cluster": ["Reachable Nodes By Instance", "Unreachable Nodes By Instance"],
        "Process": [
            "CPU Usage By Instance",
            "Resident Memory By Instance",
            "Open File Descriptors By Instance",
        ],
    },
    "pico-gossip.json": {
        "State": ["Active Entries By Instance", "Deleted Entries By Instance"],
        "Network": [
            "Inbound Connections Per Second By Instance",
            "Outbound Connections Per Second By Instance",
            "Inbound Stream Bytes Per Second By Instance",
            "Outbound Stream Bytes Per Second By Instance",
            "Inbound Packet Bytes Per Second By Instance",
            "Outbound Packet Bytes Per Second By Instance",
            "Decode Errors Per Second By Instance",
        ],
    },
    "pico-proxy.json": {
        "Requests": [
            "Proxy Requests By Status",
            "Proxy Requests By Instance",
            "Request Latency",
            "Request Size",
            "Response Size",
            "Requests In Flight",
        ],
        "Routing": [
            "Forwarded Local By Instance",
            "Forwarded Remote By Source",
            "Forwarded Remote By Target",
        ],
        "Upstreams": [
            "Connected Upstreams By Instance",
            "Registered Endpoints By Instance",
            "Tunnel Streams",
            "Flow-Control Blocked Bytes",
            "Streams Waiting For Window",
        ],
    },
}
TITLES = {
    "pico-cluster.json": "Pico Cluster",
    "pico-gossip.json": "Pico Gossip",
    "pico-proxy.json": "Pico Proxy",
}

# Labels Prometheus adds at scrape time (job, instance) or from deploy/prometheus.yaml.
TARGET_LABELS = {"job", "instance", "pod", "cluster", "namespace"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
RATE_FUNCTIONS = {"rate", "irate", "increase"}
PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
}


# ---------------------------------------------------------------------------
# The real /metrics output


@dataclass
class Exposition:
    """Metric families (name -> type) and the label names seen on each family's samples."""

    types: dict[str, str] = field(default_factory=dict)
    labels: dict[str, set[str]] = field(default_factory=dict)
    samples: set[str] = field(default_factory=set)

    def add(self, text: str) -> None:
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(maxsplit=3)
                self.types[name] = kind
                self.labels.setdefault(name, set())
            elif line and not line.startswith("#"):
                m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s", line)
                assert m, f"unparsable sample line: {line!r}"
                self.samples.add(m.group(1))
                family = self.family_of(m.group(1))
                names = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(2) or ""))
                self.labels.setdefault(family, set()).update(names)

    def family_of(self, name: str) -> str:
        """The family a series name belongs to (histogram `_bucket` etc. map to the base)."""
        if name in self.types:
            return name
        for suffix in HISTOGRAM_SUFFIXES:
            base = name.removesuffix(suffix)
            if base != name and self.types.get(base) in ("histogram", "summary"):
                return base
        return name


async def _scrape() -> tuple[str, str]:
    h = Harness()
    try:
        a = await h.node()
        assert a.addrs is not None
        gossip_host, gossip_port = a.addrs.gossip
        b = await h.node(cluster={"join": [f"{gossip_host}:{gossip_port}"]})
        port = await h.service(sample_app())
        await h.agent(a, [f"dash/127.0.0.1:{port}"])
        await h.tunnel_up(a, "dash")
        await wait_for(
            lambda: (
                a.node_id in b.cluster.remotes
                and b.cluster.remotes[a.node_id].endpoints.get("dash") == 1
            ),
            what="endpoint gossiped to the second node",
        )
        async with aiohttp.ClientSession() as http:
            for node in (a, b):
                for path in ("/", "/echo"):
                    async with http.post(
                        proxy_url(node) + path,
                        data=b"x" * 300,
                        headers={"x-pico-endpoint": "dash"},
                    ) as resp:
                        await resp.read()

            async def metrics(node: Node) -> str:
                async with http.get(admin_url(node) + "/metrics") as resp:
                    assert resp.status == 200
                    return await resp.text()

            return await metrics(a), await metrics(b)
    finally:
        await h.close()


@pytest.fixture(scope="module")
def exposition() -> Exposition:
    texts = asyncio.run(asyncio.wait_for(_scrape(), 60))
    exp = Exposition()
    for text in texts:
        exp.add(text)
    # The traffic above must have produced the label-dependent series the dashboards use.
    assert "pico_proxy_requests_total" in exp.samples
    assert "pico_proxy_forwarded_remote_total" in exp.samples, "no remote forwarding happened"
    assert "pico_proxy_request_latency_seconds_bucket" in exp.samples
    return exp


# ---------------------------------------------------------------------------
# Dashboards and PromQL


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _panels(dashboard: dict[str, Any]) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """(row title, panel) for every non-row panel, including panels of collapsed rows."""
    row: str | None = None
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            row = panel.get("title")
            for inner in panel.get("panels", []):
                yield row, inner
        else:
            yield row, panel


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and templating query."""
    for _row, panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel.get('title')!r}", target["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            text = query["query"] if isinstance(query, dict) else query
            yield f"variable {var['name']!r}", text


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*)")


@dataclass
class Selector:
    metric: str
    matchers: set[str]  # label names used in {...}
    rated: bool  # directly inside rate()/irate()/increase()


@dataclass
class Parsed:
    selectors: list[Selector]
    grouping: set[str]  # label names in by (...) / on (...) etc.


def parse_promql(expr: str) -> Parsed:
    """A small PromQL reader: enough to find metric names, label names and rate() use."""
    # label_values(metric, label): a Grafana templating function.
    lv = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*", expr)
    if lv:
        return Parsed([Selector(lv.group(1), set(), False)], {lv.group(2)})
    # Label matchers: record the label names, then blank the braces (values may hold anything).
    matchers: dict[int, set[str]] = {}

    def strip_braces(m: re.Match[str]) -> str:
        inner = _STRING.sub('""', m.group(1))
        matchers[m.start()] = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", inner))
        return "{" + " " * (len(m.group(0)) - 2) + "}"

    text = re.sub(r"\{([^}]*)\}", strip_braces, expr)
    text = _STRING.sub(lambda m: '"' + " " * (len(m.group(0)) - 2) + '"', text)
    text = _RANGE.sub(lambda m: " " * len(m.group(0)), text)
    grouping: set[str] = set()

    def strip_grouping(m: re.Match[str]) -> str:
        grouping.update(x.strip() for x in m.group(2).split(",") if x.strip())
        return " " * len(m.group(0))

    text = _GROUPING.sub(strip_grouping, text)
    selectors: list[Selector] = []
    for m in _IDENT.finditer(text):
        name, end = m.group(1), m.end()
        rest = text[end:].lstrip()
        if rest.startswith("("):  # a function or an aggregation
            continue
        if name.lower() in PROMQL_KEYWORDS:
            continue
        before = text[: m.start()].rstrip()
        fn = re.search(r"([a-zA-Z_]\w*)\s*\($", before)
        brace = end if text[end : end + 1] == "{" else None
        selectors.append(
            Selector(
                metric=name,
                matchers=matchers.get(brace, set()) if brace is not None else set(),
                rated=bool(fn and fn.group(1) in RATE_FUNCTIONS),
            )
        )
    return Parsed(selectors, grouping)


def test_parse_promql() -> None:
    p = parse_promql(
        'histogram_quantile(0.99, sum by (le, instance) (rate(a_bucket{x="1", y=~"$v"}'
        "[$__rate_interval]))) / on (instance) group_left b + ignoring(z) sum without (w) (c_total)"
    )
    assert [(s.metric, s.matchers, s.rated) for s in p.selectors] == [
        ("a_bucket", {"x", "y"}, True),
        ("b", set(), False),
        ("c_total", set(), False),
    ]
    assert p.grouping == {"le", "instance", "z", "w"}
    assert parse_promql("label_values(m, instance)").selectors[0].metric == "m"


# ---------------------------------------------------------------------------
# Tests


def test_dashboards_exist() -> None:
    assert {p.name for p in DASHBOARD_FILES} >= set(EXPECTED)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dashboard = _load(path)
    assert dashboard["title"] == TITLES.get(path.name, dashboard["title"])
    assert dashboard.get("uid"), "dashboards need a stable uid (links survive re-provisioning)"
    assert dashboard.get("id") is None, "provisioned dashboards must not pin a database id"
    assert 36 <= dashboard["schemaVersion"] <= 41
    panels = list(_panels(dashboard))
    assert panels
    ids = [p["id"] for p in dashboard["panels"] if p.get("type") == "row"]
    ids += [p["id"] for _row, p in panels]
    assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
    for _row, panel in panels:
        title = panel.get("title")
        assert title, f"{path.name}: panel {panel.get('id')} has no title"
        assert panel.get("datasource", {}).get("uid") == DATASOURCE_UID, title
        targets = panel.get("targets")
        assert targets, f"{path.name}: panel {title!r} has no targets"
        for target in targets:
            assert target.get("expr", "").strip(), f"{path.name}: {title!r} has an empty query"
            assert target.get("datasource", {}).get("uid", DATASOURCE_UID) == DATASOURCE_UID
            assert "refId" in target
            # Rates must follow the scrape interval, not a hard-coded window.
            for window in re.findall(r"\[([^\]]*)\]", target["expr"]):
                assert window == "$__rate_interval", f"{title!r}: range [{window}]"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, title
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title!r} has no unit"
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            assert var["datasource"]["uid"] == DATASOURCE_UID


def test_every_dashboard_file_has_expected_panel_titles() -> None:
    assert sorted(p.name for p in DASHBOARD_FILES) == sorted(EXPECTED)


@pytest.mark.parametrize(
    "path", [DASHBOARDS / name for name in sorted(EXPECTED)], ids=lambda p: p.name
)
def test_panel_titles_match_spec(path: Path) -> None:
    expected = EXPECTED[path.name]
    by_row: dict[str | None, list[str]] = {}
    for row, panel in _panels(_load(path)):
        by_row.setdefault(row, []).append(panel["title"])
    for row, titles in expected.items():
        assert row in by_row, f"{path.name}: no row {row!r} (rows: {list(by_row)})"
        missing = [t for t in titles if t not in by_row[row]]
        assert not missing, f"{path.name}: row {row!r} lacks {missing}"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_queries_use_real_metrics(path: Path, exposition: Exposition) -> None:
    problems: list[str] = []
    for where, expr in _queries(_load(path)):
        parsed = parse_promql(expr)
        if not parsed.selectors:
            problems.append(f"{where}: no metric in {expr!r}")
        available = set(TARGET_LABELS)
        for sel in parsed.selectors:
            family = exposition.family_of(sel.metric)
            kind = exposition.types.get(family)
            if kind is None:
                problems.append(f"{where}: unknown metric {sel.metric!r}")
                continue
            if family != sel.metric and sel.metric.endswith("_bucket"):
                available.add("le")
            labels = exposition.labels[family] | available
            available |= exposition.labels[family]
            unknown = sel.matchers - labels
            if unknown:
                problems.append(f"{where}: {sel.metric} has no label(s) {sorted(unknown)}")
            if kind == "counter" and not sel.rated:
                problems.append(f"{where}: counter {sel.metric} used without rate()")
            if kind == "gauge" and sel.rated:
                problems.append(f"{where}: rate() of gauge {sel.metric}")
            if kind == "histogram" and sel.metric == family:
                problems.append(
                    f"{where}: histogram {family} used without a _bucket/_sum/_count suffix"
                )
        unknown_groups = parsed.grouping - available
        if unknown_groups:
            problems.append(f"{where}: grouping by unknown label(s) {sorted(unknown_groups)}")
        if "histogram_quantile" in expr:
            inner = [s for s in parsed.selectors if s.metric.endswith("_bucket")]
            if not inner or "le" not in parsed.grouping:
                problems.append(f"{where}: histogram_quantile needs a _bucket rate summed by le")
    assert not problems, "\n".join(problems)


def test_label_dependent_series_are_scraped(exposition: Exposition) -> None:
    """The labels the dashboards split by are on the real series (not just declared)."""
    assert {"status", "method"} <= exposition.labels["pico_proxy_requests_total"]
    assert {"status", "method", "le"} <= exposition.labels["pico_proxy_request_latency_seconds"]
    assert "node_id" in exposition.labels["pico_proxy_forwarded_remote_total"]
    assert "status" in exposition.labels["pico_cluster_nodes"]
    assert {"deleted", "internal"} <= exposition.labels["pico_gossip_entries"]
    assert "state" in exposition.labels["pico_tunnel_streams"]
    assert "unit" in exposition.labels["pico_tunnel_flow_control_blocked"]


def test_legends_and_units() -> None:
    """Per-instance panels label series by instance; rates and sizes carry real units."""
    for path in DASHBOARD_FILES:
        for _row, panel in _panels(_load(path)):
            title, unit = panel["title"], panel["fieldConfig"]["defaults"]["unit"]
            legends = [t.get("legendFormat", "") for t in panel["targets"]]
            if title.endswith("By Instance"):
                assert all("{{instance}}" in lg for lg in legends), (path.name, title, legends)
            exprs = " ".join(t["expr"] for t in panel["targets"])
            if "Bytes Per Second" in title:
                assert unit == "Bps", (title, unit)
            elif "_total" in exprs and "requests" in exprs:
                assert unit == "reqps", (title, unit)
            if "_seconds_bucket" in exprs:
                assert unit == "s", (title, unit)
            if "_bytes_bucket" in exprs:
                assert unit == "bytes", (title, unit)
            if "histogram_quantile" in exprs:
                assert sorted(legends) == ["p50", "p95", "p99"], (title, legends)


def test_compose_mounts_dashboards_where_provisioning_reads_them() -> None:
    provider = yaml.safe_load(PROVISIONING.read_text(encoding="utf-8"))["providers"][0]
    container_path = provider["options"]["path"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text(encoding="utf-8"))
    mounts: dict[str, str] = {}
    for volume in compose["services"]["grafana"]["volumes"]:
        source, target, *_ = str(volume).split(":")
        mounts[target] = source
    assert container_path in mounts, f"{container_path} is not mounted into grafana"
    assert (DEPLOY / mounts[container_path]).resolve() == DASHBOARDS.resolve()
    assert "/etc/grafana/provisioning" in mounts
    assert (DEPLOY / mounts["/etc/grafana/provisioning"]).resolve() == PROVISIONING.parents[1]
    datasources = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    assert DATASOURCE_UID in {d["uid"] for d in datasources}
