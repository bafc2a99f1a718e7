"""/metrics on the deployed lab: every api-pe, the DSD where Pacemaker runs it, HAProxy's exporter, and
`congressctl status --output prometheus`, each read with prometheus_client's text parser (lab only)."""

from __future__ import annotations

import httpx
import pytest
from fixtures_cluster import congressctl
from prometheus_client.parser import text_string_to_metric_families
from test_node_metrics import check_conventions

from congressctl import lab as labmod
from congressctl import pacemaker

pytestmark = pytest.mark.lab


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _get(url: str) -> str:
    response = httpx.get(url, timeout=5)
    assert response.status_code == 200, f"{url}: {response.status_code}"
    return response.text


def _placement(cluster) -> pacemaker.Placement:
    proc = labmod.lab_exec(cluster.lab, cluster.inv.nodes[0].name, ["crm_mon", "-1", "--output-as=xml"], timeout=60)
    out = proc.stdout.decode() if isinstance(proc.stdout, bytes) else proc.stdout
    return pacemaker.parse_crm_mon(out)


def _requests(cluster, route: str) -> float:
    total = 0.0
    for node in cluster.inv.with_role("api-pe"):
        samples = _samples(_get(f"http://{node.address}:{cluster.inv.metrics.api_pe_port}/metrics"))
        total += sum(v for (name, labels), v in samples.items() if name == "congress_api_requests_total"
                     and dict(labels)["route"] == route and dict(labels)["method"] == "GET")
    return total


def test_every_node_serves_metrics_on_its_own_address(cluster) -> None:
    inv = cluster.inv
    for node in inv.with_role("api-pe"):
        text = _get(f"http://{node.address}:{inv.metrics.api_pe_port}/metrics")
        check_conventions(text)
        samples = _samples(text)
        assert samples[("congress_pe_synced", ())] == 1
        assert samples[("congress_bus_connected", ())] == 1
    placement = _placement(cluster)
    dsd_host = inv.node(placement.on("dsd")[0])
    dsd = _samples(_get(f"http://{dsd_host.address}:{inv.metrics.dsd_port}/metrics"))
    leaders = [dict(labels)["pe"] for (name, labels), v in dsd.items() if name == "congress_dsd_leader" and v == 1]
    assert len(leaders) == 1 and leaders[0] in {n.name for n in inv.with_role("api-pe")}
    haproxy_host = inv.node(placement.on("haproxy")[0])
    text = _get(f"http://{haproxy_host.address}:{inv.metrics.haproxy_port}/metrics")
    up = [s for f in text_string_to_metric_families(text) if f.name == "haproxy_server_status" for s in f.samples
          if s.labels["proxy"] == "congress_api_pe" and s.labels.get("state") == "UP" and s.value == 1]
    assert sorted(s.labels["server"] for s in up) == sorted(n.name for n in inv.with_role("api-pe"))


def test_a_request_through_the_vip_shows_in_its_routes_counter(cluster) -> None:
    inv = cluster.inv
    route = "/v1/policies"
    before = _requests(cluster, route)
    assert httpx.get(f"{inv.api_url()}{route}", headers=cluster.headers, verify=cluster.verify,
                     timeout=5).status_code == 200
    assert _requests(cluster, route) == before + 1


def test_status_output_prometheus_on_the_lab(cluster) -> None:
    proc = congressctl("status", "-i", str(cluster.inventory_path), "--output", "prometheus", timeout=60)
    assert proc.returncode == 0, proc.stderr
    check_conventions(proc.stdout)
    samples = _samples(proc.stdout)
    assert samples[("congress_cluster_health", (("health", "healthy"),))] == 1
    assert samples[("congress_cluster_quorate", ())] == 1
