"""`congressctl status --output prometheus`: the cluster view of a StatusReport in the Prometheus text format.

What the nodes' own /metrics cannot say, since each sees only itself: quorum and placement as Pacemaker has
them, HAProxy's backends, the bus's replication, the DSD's leader and each PE's lag, the API through the VIP.
One sample per run, for node_exporter's textfile collector or a one-off scrape; every family is a gauge.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from congressctl.status import HEALTH_EXIT, StatusReport

PREFIX = "congress_cluster_"


def _family(name: str, doc: str, labels: list[str], samples: Sequence[tuple[list[str], float | None]]) -> Metric:
    family = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
    for values, value in samples:
        if value is not None:
            family.add_metric(values, float(value))
    return family


def _flag(value: bool | None) -> int | None:
    return None if value is None else int(value)


class _ReportCollector:
    def __init__(self, report: StatusReport):
        self.report = report

    def collect(self) -> Iterator[Metric]:
        yield from self._health()
        yield from self._hosts()
        yield from self._bus()
        yield from self._nodes()
        yield from self._dsd()

    def _health(self) -> Iterator[Metric]:
        r = self.report
        yield _family("health", "1 for the cluster's health as status judged it (healthy, degraded, "
                      "unavailable).", ["health"], [([h], int(h == r.health)) for h in HEALTH_EXIT])
        yield _family("problems", "Problems status found.", [], [([], len(r.problems))])
        yield _family("status_duration_seconds", "How long gathering the status took.", [], [([], r.duration_s)])
        yield _family("api_up", "1 when /healthz through the VIP answered 200.", ["url"],
                      [([r.api.url], int(r.api.ok))])
        yield _family("api_latency_seconds", "/healthz through the VIP.", ["url"],
                      [([r.api.url], None if r.api.latency_ms is None else r.api.latency_ms / 1000)])
        quorate = r.placement.quorum if r.placement is not None else None
        yield _family("quorate", "1 when the cluster view status trusts has quorum.", [], [([], _flag(quorate))])

    def _hosts(self) -> Iterator[Metric]:
        hosts = self.report.hosts
        yield _family("host_reachable", "1 when status reached the host over SSH.", ["host"],
                      [([h.name], int(h.reachable)) for h in hosts])
        yield _family("host_online", "1 when the host is an online cluster member.", ["host"],
                      [([h.name], _flag(h.online)) for h in hosts])
        yield _family("host_quorum", "1 when the host's own crm_mon says it has quorum.", ["host"],
                      [([h.name], _flag(h.quorum)) for h in hosts])
        yield _family("host_dc", "1 for the host the others name the designated controller.", ["host"],
                      [([h.name], int(h.dc == h.name)) for h in hosts if h.dc is not None])
        placed = [([h.name, res.removesuffix(" (promoted)"), str(res.endswith(" (promoted)")).lower()], 1)
                  for h in hosts for res in h.resources]
        yield _family("resource_placed", "1 for each resource running on a host.",
                      ["host", "resource", "promoted"], placed)
        yield _family("haproxy_backend_up", "1 for each HAProxy server that is UP, as the HAProxy on that host says.",
                      ["host", "server"], [([h.name, b.server], int(b.up)) for h in hosts for b in h.backends])

    def _bus(self) -> Iterator[Metric]:
        bus = self.report.bus
        if bus is None:
            return
        yield _family("bus_promoted", "1 for the bus node whose Redis is the master.", ["node"],
                      [([n], 1) for n in bus.promoted])
        yield _family("bus_replicas_in_sync", "Replicas the master counts as in sync.", [], [([], bus.in_sync)])
        yield _family("bus_sync_replicas", "Replicas every write waits for.", [], [([], bus.sync_replicas)])
        yield _family("bus_writes_replicated", "1 when writes are acknowledged replicated.", [],
                      [([], int(bus.replicated))])
        yield _family("bus_replica_lag_bytes", "Bytes the master sent that the replica has not acknowledged.",
                      ["node"], [([n.node], n.lag_bytes) for n in bus.nodes])
        yield _family("bus_replica_link_up", "1 while a replica's link to its master is up.", ["node"],
                      [([n.node], int(n.link == "up")) for n in bus.nodes if n.role == "replica"])

    def _nodes(self) -> Iterator[Metric]:
        nodes = [n for n in self.report.nodes if n.expected]
        yield _family("node_alive", "1 while the node process's heartbeat is fresh.", ["node", "role"],
                      [([n.node, n.role], int(n.alive)) for n in nodes])
        yield _family("node_heartbeat_age_seconds", "Age of the freshest sighting of the node's heartbeat.",
                      ["node", "role"],
                      [([n.node, n.role], None if n.age_ms is None else n.age_ms / 1000) for n in nodes])
        yield _family("node_healthy", "1 while the api-pe's /healthz would answer 200.", ["node"],
                      [([n.node], _flag(n.healthy)) for n in nodes if n.role == "api-pe"])

    def _dsd(self) -> Iterator[Metric]:
        dsd = self.report.dsd
        if dsd is None:
            return
        yield _family("dsd_placed", "1 for the host Pacemaker runs the DSD on.", ["host"],
                      [([h], 1) for h in dsd.running_on])
        yield _family("dsd_epoch", "The DSD's epoch.", [], [([], dsd.epoch)])
        leader = dsd.leader or {}
        yield _family("dsd_leader", "1 for the PE whose requests the DSD runs.", ["pe"],
                      [([str(leader["node"])], 1)] if leader.get("node") else [])
        yield _family("dsd_leader_since_timestamp_seconds", "When the DSD took its current leader (Unix time).",
                      [], [([], dsd.leader_since)])
        yield _family("table_lag", "Publications each PE is behind the DSD, per table.", ["table", "pe"],
                      [([t.table, pe], lag) for t in dsd.tables for pe, lag in t.lag.items()])


def render(report: StatusReport) -> str:
    """The report as Prometheus text (version 0.0.4)."""
    registry = CollectorRegistry()
    registry.register(_ReportCollector(report))
    return generate_latest(registry).decode()
