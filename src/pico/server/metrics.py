"""Prometheus metrics of one node, in a registry of its own (several nodes may share a process).

Label values are bounded: status codes, methods from a fixed set, node ids of the cluster.
No endpoint label on node-wide metrics (endpoint names are user-chosen and unbounded).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pico.http.settings import RequestRecord
from pico.server.tcp import TcpRecord

_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)
# Latency buckets from 1 ms to ~33 s: a tunnel hop is sub-millisecond, slow services take seconds.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZE_BUCKETS = tuple(256 * 4**k for k in range(8))
_MAX_TRACKED_ENDPOINTS = 10_000


class NodeMetrics:
    """The metrics a node exports on its admin port."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # Per-request metrics are plain counters in Python objects, turned into Prometheus
        # families at scrape time: prometheus_client's locked counters and histograms cost
        # ~1-2 us per operation, five of them per request.
        self.proxy = ProxyStats()
        r.register(self.proxy)
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
        # Labels are bounded: three ports, and the reasons pico.auth defines.
        self.auth_failures = Counter(
            "pico_auth_failures_total",
            "Requests refused for their token, by port and reason.",
            ["port", "reason"],
            registry=r,
        )

        self.limit_rejections = Counter(
            "pico_limit_rejections_total",
            "Connections, tunnels, streams and frames refused for a limit, by limit (its "
            "config key).",
            ["limit"],
            registry=r,
        )
        # TCP connections through /_pico/v1/tcp (pico.server.tcp); bytes are counted when
        # a connection ends.
        self.tcp_connections = Counter(
            "pico_tcp_connections_total", "TCP connections bridged to tunnels.", registry=r
        )
        self.tcp_active = Gauge(
            "pico_tcp_active_connections", "TCP connections open through tunnels.", registry=r
        )
        self.tcp_bytes = Counter(
            "pico_tcp_bytes_total",
            "Bytes of finished TCP connections, by direction (in: client to service).",
            ["direction"],
            registry=r,
        )
        # Looked up once: labels() takes a lock and builds a key, per connection otherwise.
        self._tcp_bytes_in = self.tcp_bytes.labels("in")
        self._tcp_bytes_out = self.tcp_bytes.labels("out")

    def limit_rejected(self, limit: str) -> None:
        """Count one refusal for `limit`."""
        self.limit_rejections.labels(limit).inc()

    def tcp_opened(self) -> None:
        """A TCP connection was bridged to a tunnel stream."""
        self.tcp_connections.inc()
        self.tcp_active.inc()

    def tcp_closed(self, record: TcpRecord) -> None:
        """A TCP connection ended."""
        self.tcp_active.dec()
        self._tcp_bytes_in.inc(record.bytes_in)
        self._tcp_bytes_out.inc(record.bytes_out)

    def auth_failure_counter(self, port: str) -> Callable[[str], None]:
        """What a port's verifier calls with the reason of each refusal."""
        return lambda reason: self.auth_failures.labels(port, reason).inc()

    def observe(self, record: RequestRecord) -> None:
        """Account one finished request (the hot path)."""
        self.proxy.observe(record)

    def add_collector(self, collector: Collector) -> None:
        """Register an extra collector (cluster or gossip state computed at scrape time)."""
        self.registry.register(collector)


class _FamilyCollector(Collector):
    """A labelled metric whose values are read from a callback at scrape time."""

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

    def _fill(self, family: GaugeMetricFamily | CounterMetricFamily) -> Metric:
        for label_values, value in self.read():
            family.add_metric(list(label_values), value)
        return family


class GaugeCollector(_FamilyCollector):
    """A gauge whose labelled values are read from a callback at scrape time."""

    def collect(self) -> Iterator[Metric]:
        yield self._fill(GaugeMetricFamily(self.name, self.doc, labels=self.labels))


class CounterFamilyCollector(_FamilyCollector):
    """A labelled counter whose values are read from a callback at scrape time."""

    def collect(self) -> Iterator[Metric]:
        name = self.name.removesuffix("_total")
        yield self._fill(CounterMetricFamily(name, self.doc, labels=self.labels))


class CounterCollector(Collector):
    """A counter whose value is read from a callback at scrape time (kept by a sans-I/O core)."""

    def __init__(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self.name = name.removesuffix("_total")
        self.doc = doc
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.doc, value=self.read())


class _Histogram:
    """Bucket counts and sum of one histogram series (cumulated at scrape time)."""

    __slots__ = ("buckets", "counts", "total")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value

    def family_samples(self) -> tuple[list[tuple[str, float]], float]:
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            cumulative.append((repr(float(bound)), running))
        running += self.counts[-1]
        cumulative.append(("+Inf", running))
        return cumulative, self.total


class _Series:
    """Everything kept for one (status, method) pair."""

    __slots__ = ("count", "latency", "request_size", "response_size")

    def __init__(self) -> None:
        self.count = 0
        self.latency = _Histogram(_LATENCY_BUCKETS)
        self.request_size = _Histogram(_SIZE_BUCKETS)
        self.response_size = _Histogram(_SIZE_BUCKETS)


class ProxyStats(Collector):
    """Request counts, latency and size histograms, and forwarding counts of the proxy port."""

    def __init__(self) -> None:
        # Keyed by (status, method as received); unusual methods share the "OTHER" series.
        # httptools only accepts the methods it knows, so the key set is bounded.
        self.by_label: dict[tuple[int, str], _Series] = {}
        self.forwarded_local = 0
        self.forwarded_remote: dict[str, int] = {}
        # Requests per endpoint for the status API and dashboard (not a Prometheus label:
        # endpoint names are unbounded). Capped: past the cap new endpoints are not counted.
        self.by_endpoint: dict[str, list[int]] = {}

    def observe(self, record: RequestRecord) -> None:
        """Account one finished request."""
        key = (record.status, record.method)
        series = self.by_label.get(key)
        if series is None:
            method = record.method if record.method in _METHODS else "OTHER"
            series = self.by_label.get((record.status, method))
            if series is None:
                series = self.by_label[(record.status, method)] = _Series()
            self.by_label[key] = series
        series.count += 1
        series.latency.observe(record.duration)
        series.request_size.observe(record.bytes_in)
        series.response_size.observe(record.bytes_out)
        if record.upstream:  # only endpoints that exist: clients choose the names
            counts = self.by_endpoint.get(record.endpoint)
            if counts is None and len(self.by_endpoint) < _MAX_TRACKED_ENDPOINTS:
                counts = self.by_endpoint[record.endpoint] = [0, 0]
            if counts is not None:
                counts[0] += 1
                if record.status >= 500:
                    counts[1] += 1
        if record.upstream:
            if record.remote:
                remote = self.forwarded_remote
                remote[record.upstream] = remote.get(record.upstream, 0) + 1
            else:
                self.forwarded_local += 1

    def forget_node(self, node_id: str) -> None:
        """Drop the series of a node that left the cluster (bounded label values)."""
        self.forwarded_remote.pop(node_id, None)

    def collect(self) -> Iterator[Metric]:
        labels = ["status", "method"]
        requests = CounterMetricFamily(
            "pico_proxy_requests",
            "Requests handled by the proxy port, by response status and method.",
            labels=labels,
        )
        histograms = [
            (
                HistogramMetricFamily(
                    "pico_proxy_request_latency_seconds",
                    "Time from the request head to the end of the response.",
                    labels=labels,
                ),
                "latency",
            ),
            (
                HistogramMetricFamily(
                    "pico_proxy_request_size_bytes", "Request body bytes received.", labels=labels
                ),
                "request_size",
            ),
            (
                HistogramMetricFamily(
                    "pico_proxy_response_size_bytes", "Response body bytes sent.", labels=labels
                ),
                "response_size",
            ),
        ]
        for (status, method), series in sorted(self.by_label.items()):
            if method not in _METHODS and method != "OTHER":
                continue  # an alias of the OTHER series
            values = [str(status), method]
            requests.add_metric(values, series.count)
            for family, attr in histograms:
                buckets, total = getattr(series, attr).family_samples()
                family.add_metric(values, buckets, total)
        yield requests
        for family, _ in histograms:
            yield family
        yield CounterMetricFamily(
            "pico_proxy_forwarded_local",
            "Requests sent through a tunnel on this node.",
            value=self.forwarded_local,
        )
        remote = CounterMetricFamily(
            "pico_proxy_forwarded_remote",
            "Requests forwarded to another node, by target node.",
            labels=["node_id"],
        )
        for node_id, n in sorted(self.forwarded_remote.items()):
            remote.add_metric([node_id], n)
        yield remote
