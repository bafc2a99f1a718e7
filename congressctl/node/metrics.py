"""Prometheus metrics of one node process: `/metrics` in the text format, on a port of its own.

The port is not the API's and is bound to the node address (node config `metrics`, rendered from the
inventory's `metrics` section): a scraper needs no API token, and nothing served there is a data row or a
secret (counts, ages, (epoch, seq) per table and latencies only). HAProxy does not front it.

Most figures already live in the node (the DSD's request counts, each table's (epoch, seq), the bus's
connects): collectors read them when a scrape comes, so they cost the path of a change nothing. Only what the
node does not count itself is recorded where it happens: latency histograms, HTTP requests by route and status,
full syncs. With `record: false` those calls do nothing (bench/bus.py's baseline). The server runs on the
node's event loop, so a collector reads the node's dicts while nothing changes them (a thread, as
prometheus_client's own server uses, could see them change size mid-read).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from congressctl.errors import PolicyError
from congressctl.node.config import MetricsConfig

log = logging.getLogger("congressctl.metrics")

# from half a millisecond (a claim round trip on one host) to the seconds a bus failover holds things up
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
READ_TIMEOUT_S = 5.0
MAX_HEAD = 16 * 1024
OTHER_ROUTE = "other"   # requests no route matched: their paths stay out of the labels

def _nothing(*_args: Any) -> None:
    """What a hot-path call does when recording is off."""


def _latency(name: str, doc: str, registry: CollectorRegistry, labels: tuple[str, ...] = ()) -> Histogram:
    return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS_S, registry=registry)


def gauge(name: str, doc: str, value: float | None, labels: dict[str, str] | None = None) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    if value is not None:
        family.add_metric(list((labels or {}).values()), value)
    return family


def counter(name: str, doc: str, value: float) -> Metric:
    """`name` without `_total`: the family adds it."""
    return CounterMetricFamily(name, doc, value=value)


class NodeMetrics:
    """One process's registry (process, platform and GC facts included), its /metrics server, and the calls
    the node makes where something happens."""

    def __init__(self, *, role: str, cfg: MetricsConfig):
        self.role = role
        self.cfg = cfg
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.server: asyncio.AbstractServer | None = None

    def recorder(self, observe: Callable[[float], None]) -> Callable[[float], None]:
        return observe if self.cfg.record else _nothing

    def watch(self, collector: Any) -> None:
        """Register a collector whose `collect()` reads the node at scrape time."""
        self.registry.register(collector)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # -- the /metrics server ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen on the role's metrics port, if it has one. A port that cannot be bound is logged and the node
        runs on: the metrics watch the service, they must not take it down."""
        port = self.cfg.port(self.role)
        if not port:
            return
        try:
            self.server = await asyncio.start_server(self._connection, self.cfg.bind, port, reuse_address=True)
        except OSError as exc:
            log.error("metrics not served on %s:%d: %s (the node runs on without them)", self.cfg.bind, port,
                      exc.strerror)
            return
        log.info("metrics on http://%s:%d/metrics", self.cfg.bind, port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request per connection (answered with `Connection: close`): a scrape every few seconds does
        not need keep-alive."""
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.write(self._answer(head))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()

    def _answer(self, head: bytes) -> bytes:
        parts = head.split(b" ", 2)
        method, target = (parts[0], parts[1]) if len(parts) == 3 else (b"", b"")
        if method not in (b"GET", b"HEAD") or target.split(b"?", 1)[0] != b"/metrics":
            return _response(404, b"text/plain", b"only GET /metrics here\n")
        try:
            body = self.exposition()
        except Exception as exc:   # a collector's bug answers 500 and is logged; the node runs on
            log.exception("metrics collection failed")
            return _response(500, b"text/plain", f"collection failed: {type(exc).__name__}\n".encode())
        return _response(200, CONTENT_TYPE_LATEST.encode(), b"" if method == b"HEAD" else body)


def _response(status: int, content_type: bytes, body: bytes) -> bytes:
    reason = {200: b"OK", 404: b"Not Found", 500: b"Internal Server Error"}[status]
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (status, reason, content_type, len(body)) + body)


# ------------------------------------------------------------------------------------------------- both roles


def bus_metrics(node: Any, now: float) -> Iterator[Metric]:
    """The node's bus session and who it is (the `congress_node_info` labels)."""
    bus = node.bus
    yield gauge("congress_node_info", "This node process (value 1).", 1,
                {"cluster": node.cfg.cluster, "node": node.cfg.node_id, "incarnation": node.incarnation})
    yield gauge("congress_bus_connected", "1 while subscribed to the control bus.", int(bus.connected))
    yield counter("congress_bus_reconnects", "Bus sessions started again after the first.", max(0, bus.reconnects - 1))
    yield gauge("congress_bus_last_message_age_seconds", "Seconds since the bus last delivered a message "
                "(heartbeats every interval: more than one means the bus is away).", now - bus.last_message)


# ------------------------------------------------------------------------------------------------- DSD


class DsdMetrics(NodeMetrics):
    """What the DSD records: the action POST's latency and the claim round trip's."""

    def __init__(self, cfg: MetricsConfig):
        super().__init__(role="dsd", cfg=cfg)
        self.action_post = self.recorder(_latency(
            "congress_dsd_action_post_seconds", "An action's POST to its datasource, retries included.",
            self.registry).observe)
        self.claim = self.recorder(_latency(
            "congress_dsd_claim_seconds", "One round trip claiming actions and marking them done in Redis.",
            self.registry).observe)


class DsdCollector:
    def __init__(self, node: Any):
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node, now = self.node, time.monotonic()
        lead = node.leadership
        counts = lead.counts
        yield from bus_metrics(node, now)
        for outcome, doc in (("executed", "Actions run (POST answered below 500)."),
                             ("replayed", "Buffered requests run after their PE became the leader."),
                             ("ignored", "Requests for actions that had already run."),
                             ("expired", "Buffered requests dropped unrun (their PE never became the leader)."),
                             ("failed", "Actions whose POST failed or that could not be claimed in time.")):
            yield counter(f"congress_dsd_actions_{outcome}", doc, getattr(counts, outcome))
        yield counter("congress_dsd_leader_changes", "Times the DSD took a PE as its leader.", counts.leader_changes)
        leader = GaugeMetricFamily("congress_dsd_leader", "The PE whose requests the DSD runs (value 1).",
                                   labels=["pe", "incarnation"])
        if lead.leader is not None:
            leader.add_metric(list(lead.leader), 1)
        yield leader
        yield gauge("congress_dsd_epoch", "This DSD's epoch (a new one at every DSD start).", node.epoch)
        yield gauge("congress_dsd_buffered_requests", "Requests of non-leader PEs kept for a replay.",
                    sum(len(b) for b in lead.buffers.values()))
        seq = GaugeMetricFamily("congress_dsd_table_seq", "Last published seq of each table (this epoch).",
                                labels=["datasource", "table"])
        rows = GaugeMetricFamily("congress_dsd_table_rows", "Rows of each table as last published.",
                                 labels=["datasource", "table"])
        for state in node.tables.values():
            seq.add_metric([state.ds_name, state.table], state.seq)
            rows.add_metric([state.ds_name, state.table], len(state.rows))
        yield seq
        yield rows
        beat = GaugeMetricFamily("congress_dsd_pe_heartbeat_age_seconds", "Seconds since each PE's last heartbeat.",
                                 labels=["pe", "incarnation"])
        for peer in node.bus.peers.values():
            if peer.role == "api-pe":
                beat.add_metric([peer.node, peer.incarnation], peer.age(now))
        yield beat


# ------------------------------------------------------------------------------------------------- api-pe


class ApiPeMetrics(NodeMetrics):
    """What the api-pe records: HTTP requests (RequestMetrics), each applied diff's evaluation, full syncs."""

    def __init__(self, cfg: MetricsConfig):
        super().__init__(role="api-pe", cfg=cfg)
        self.requests = Counter("congress_api_requests", "HTTP requests answered, by route template, method and "
                                "status.", ("route", "method", "status"), registry=self.registry)
        self.request_seconds = _latency("congress_api_request_duration_seconds", "HTTP request latency by route "
                                        "template and method.", self.registry, ("route", "method"))
        self.diff_eval = self.recorder(_latency(
            "congress_pe_diff_eval_seconds", "Policy evaluation of one applied table diff or full publication.",
            self.registry).observe)
        # not on the path of a change: counted whether recording is on or not
        self.full_syncs = Counter("congress_pe_full_syncs", "Full syncs of the mirror from the store (after each "
                                  "connect, periodically, and when a change notice went missing).",
                                  registry=self.registry)

    def asgi(self, app: Callable, routes: list) -> Callable:
        """`app` wrapped to count and time its requests (unwrapped when recording is off)."""
        if not self.cfg.record:
            return app
        return RequestMetrics(app, {r.endpoint: r.path for r in routes}, self)


class RequestMetrics:
    """Pure ASGI wrapper: each HTTP request counted by route template, method and status, and timed. The
    route is the endpoint the app matched (`scope["endpoint"]`: Starlette's router sets it, and so does
    PushFastPath for the rows PUT it takes past the router), so paths with names and ids count as their
    template; what matched nothing counts as OTHER_ROUTE."""

    def __init__(self, app: Callable, templates: dict[Callable, str], metrics: ApiPeMetrics):
        self.app = app
        self.templates = templates
        self.metrics = metrics
        self.counted: dict[tuple[str, str, int], Any] = {}   # label children, looked up once each
        self.timed: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500   # what the client gets when the app raises before answering

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: dict, status: int, seconds: float) -> None:
        endpoint = scope.get("endpoint")
        route = self.templates.get(endpoint, OTHER_ROUTE) if endpoint is not None else OTHER_ROUTE
        method = scope["method"]
        key = (route, method, status)
        count = self.counted.get(key)
        if count is None:
            count = self.counted[key] = self.metrics.requests.labels(route, method, str(status))
        count.inc()
        timed = self.timed.get(key[:2])
        if timed is None:
            timed = self.timed[key[:2]] = self.metrics.request_seconds.labels(route, method)
        timed.observe(seconds)


def _row_count(engine: Any, table: str) -> int:
    try:
        return len(engine.rows(table))
    except PolicyError:   # a table whose schema the engine refused: it holds nothing
        return 0


class ApiPeCollector:
    def __init__(self, node: Any):
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node, now = self.node, time.monotonic()
        pe = node.pe
        yield from bus_metrics(node, now)
        yield gauge("congress_pe_synced", "1 once the PE has synced since its last bus connect.", int(node.synced))
        yield gauge("congress_pe_healthy", "1 while /healthz answers 200 (HAProxy sends requests here).",
                    int(node.health_problem() is None))
        yield gauge("congress_pe_policies", "Policies in this PE's mirror.", len(pe.policies))
        yield gauge("congress_pe_rules", "Rules in this PE's mirror.", sum(len(r) for r in pe.rules.values()))
        yield gauge("congress_pe_datasources", "Datasources in this PE's mirror.", len(pe.datasources))
        yield counter("congress_pe_actions_sent", "Action requests published to the DSD.", pe.actions_sent)
        yield counter("congress_pe_actions_dropped", "Action requests dropped (the outbox was full).",
                      pe.actions_dropped)
        yield counter("congress_pe_actions_resent", "Action requests sent again (a new DSD, a reconnect).", pe.resent)
        yield gauge("congress_pe_actions_queued", "Action requests waiting to be sent.", pe.outbox.qsize())
        yield gauge("congress_pe_dsd_heartbeat_age_seconds", "Seconds since the DSD's last heartbeat.",
                    now - pe.dsd_received if pe.dsd is not None else None)
        yield from self._tables()

    def _tables(self) -> Iterator[Metric]:
        pe = self.node.pe
        labels = ["datasource", "table"]
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "seq": GaugeMetricFamily("congress_pe_table_seq", "Seq of each table held (epoch in "
                                     "congress_pe_table_epoch).", labels=labels),
            "epoch": GaugeMetricFamily("congress_pe_table_epoch", "Epoch of each table held.", labels=labels),
            "lag": GaugeMetricFamily("congress_pe_table_lag", "Publications this PE is behind the DSD's last "
                                     "heartbeat, per table (absent while not comparable: another epoch).",
                                     labels=labels),
            "rows": GaugeMetricFamily("congress_pe_table_rows", "Rows of each table held.", labels=labels),
            "diffs": CounterMetricFamily("congress_pe_table_diffs_applied", "Publications applied per table.",
                                         labels=labels),
            "resyncs": CounterMetricFamily("congress_pe_table_resyncs", "Tables replaced from the stored snapshot.",
                                           labels=labels),
        }
        for view in pe.table_status():
            key = view.table.split(":", 1)
            families["seq"].add_metric(key, view.seq)
            families["epoch"].add_metric(key, view.epoch)
            if view.lag is not None:
                families["lag"].add_metric(key, view.lag)
            families["rows"].add_metric(key, _row_count(pe.engine, view.table))
            families["diffs"].add_metric(key, view.diffs_applied)
            families["resyncs"].add_metric(key, view.resyncs)
        yield from families.values()
