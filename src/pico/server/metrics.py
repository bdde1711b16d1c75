"""Prometheus metrics of one node, in a registry of its own (several nodes may share a process).

Label values are bounded: status codes, methods from a fixed set, node ids of the cluster.
No endpoint label on node-wide metrics (endpoint names are user-chosen and unbounded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pico.http.proxy import RequestRecord

_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)
# Latency buckets from 1 ms to ~33 s: a tunnel hop is sub-millisecond, slow services take seconds.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZE_BUCKETS = tuple(256 * 4**k for k in range(8))


class NodeMetrics:
    """The metrics a node exports on its admin port."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "pico_proxy_requests_total",
            "Requests handled by the proxy port, by response status and method.",
            ["status", "method"],
            registry=r,
        )
        self.latency = Histogram(
            "pico_proxy_request_latency_seconds",
            "Time from the request head to the end of the response, by status and method.",
            ["status", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_size = Histogram(
            "pico_proxy_request_size_bytes",
            "Request body bytes received from clients.",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.response_size = Histogram(
            "pico_proxy_response_size_bytes",
            "Response body bytes sent to clients.",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.connected_upstreams = Gauge(
            "pico_proxy_connected_upstreams", "Upstream tunnels connected to this node.", registry=r
        )
        self.registered_endpoints = Gauge(
            "pico_proxy_registered_endpoints",
            "Endpoints with at least one upstream on this node.",
            registry=r,
        )
        self.upstream_connects = Counter(
            "pico_upstream_connects_total", "Upstream tunnels accepted.", registry=r
        )
        self.upstream_disconnects = Counter(
            "pico_upstream_disconnects_total", "Upstream tunnels closed.", registry=r
        )
        self.forwarded_local = Counter(
            "pico_proxy_forwarded_local_total",
            "Requests sent through a tunnel on this node.",
            registry=r,
        )
        self.forwarded_remote = Counter(
            "pico_proxy_forwarded_remote_total",
            "Requests forwarded to another node, by target node.",
            ["node_id"],
            registry=r,
        )
        self._children: dict[tuple[int, str], tuple[Counter, Histogram]] = {}

    def observe(self, record: RequestRecord) -> None:
        """Account one finished request (called on the hot path: cached label children)."""
        method = record.method if record.method in _METHODS else "OTHER"
        key = (record.status, method)
        children = self._children.get(key)
        if children is None:
            status = str(record.status)
            children = (
                self.requests.labels(status, method),
                self.latency.labels(status, method),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(record.duration)
        self.request_size.observe(record.bytes_in)
        self.response_size.observe(record.bytes_out)
        if record.upstream:
            if record.remote:
                self.forwarded_remote.labels(record.upstream).inc()
            else:
                self.forwarded_local.inc()

    def add_collector(self, collector: Collector) -> None:
        """Register an extra collector (cluster or gossip state computed at scrape time)."""
        self.registry.register(collector)


class GaugeCollector(Collector):
    """A gauge whose labelled values are read from a callback at scrape time."""

    def __init__(
        self,
        name: str,
        doc: str,
        labels: list[str],
        read: Callable[[], Iterable[tuple[Sequence[str], float]]],
    ) -> None:
        self.name = name
        self.doc = doc
        self.labels = labels
        self.read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.doc, labels=self.labels)
        for label_values, value in self.read():
            family.add_metric(list(label_values), value)
        yield family


class CounterCollector(Collector):
    """A counter whose value is read from a callback at scrape time (kept by a sans-I/O core)."""

    def __init__(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self.name = name.removesuffix("_total")
        self.doc = doc
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.doc, value=self.read())
