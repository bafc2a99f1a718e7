"""/metrics of real node processes on real Redis, read with prometheus_client's own text parser: the values
move with the workload (actions the sink counted, a leader change, requests by route); names follow the
Prometheus conventions (promtool when installed, and our own check); HAProxy's exporter answers on a config
rendered by congressctl; `status --output prometheus` from captured probes."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port, require_tool
from fixtures_redis import wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_node_failover import leader_and_survivor, push, setup_stream

from congressctl import inventory, render, status, status_metrics

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "status"
TOKEN = "feedfacecafebeef"   # the token the captures in tests/data/status were made with


def metrics_extra(role: str, *, record: bool = True) -> tuple[dict, int]:
    port = free_port()
    key = "api_pe_port" if role == "api-pe" else "dsd_port"
    return {"metrics": {"bind": "127.0.0.1", key: port, "record": record}}, port


def add(cluster, role: str, node_id: str, *, record: bool = True):
    extra, port = metrics_extra(role, record=record)
    node = cluster.add(role, node_id, extra=extra)
    node.metrics_url = f"http://127.0.0.1:{port}/metrics"
    if role == "dsd":
        wait_for(lambda: scrape_text(node.metrics_url), 10, what=f"{node_id} /metrics")
    return node


def scrape_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        return resp.read().decode()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(scrape_text(url)) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def check_conventions(text: str) -> None:
    """Prometheus's naming rules: counters end in _total, durations are _seconds, names are snake_case and ours
    share the congress_ prefix; promtool's linter too when it is installed."""
    for family in text_string_to_metric_families(text):
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", family.name), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        if not family.name.startswith(("process_", "python_")):
            assert family.name.startswith("congress_"), family.name
            assert not re.search(r"_(ms|milliseconds|us|minutes|hours)(_|$)", family.name), family.name
    promtool = shutil.which("promtool")
    if promtool:
        proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False)
        assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_actions_executed_move_by_exactly_what_the_sink_counted(node_cluster, sink):
    dsd = add(node_cluster, "dsd", "d1")
    a = add(node_cluster, "api-pe", "n1")
    assert a.request("POST", "/v1/data-sources", {
        "name": "feed", "driver": "push",
        "config": {"tables": {"items": {"columns": ["id"]}}, "action_url": sink.url}})[0] == 201
    assert a.request("POST", "/v1/policies", {"name": "p"})[0] == 201
    assert a.request("POST", "/v1/policies/p/rules", {"rule": "execute[feed:notify(x)] :- feed:items(id=x)"})[0] == 201
    before = scrape(dsd.metrics_url)
    for k in range(20):
        assert a.request("PUT", "/v1/data-sources/feed/tables/items/rows", [[i] for i in range(k + 1)])[0] == 200
    wait_for(lambda: len(sink.ids()) >= 20, 10, what="20 actions at the sink")
    time.sleep(0.5)   # the DSD counts an action once its POST is answered, a moment after the sink has it
    after = scrape(dsd.metrics_url)
    name = "congress_dsd_actions_executed_total"
    executed = value(after, name) - value(before, name)
    assert executed == len(sink.ids()) == 20
    assert value(after, "congress_dsd_action_post_seconds_count") - value(
        before, "congress_dsd_action_post_seconds_count") == 20
    assert value(after, "congress_dsd_claim_seconds_count") > value(before, "congress_dsd_claim_seconds_count")
    assert value(after, "congress_dsd_table_seq", datasource="feed", table="items") >= 21
    assert value(after, "congress_dsd_table_rows", datasource="feed", table="items") == 20
    assert value(after, "congress_dsd_leader", pe="n1", incarnation=a.get("/v1/status")[1]["incarnation"]) == 1
    assert value(after, "congress_dsd_pe_heartbeat_age_seconds", pe="n1",
                 incarnation=a.get("/v1/status")[1]["incarnation"]) < 1.0
    pe = scrape(a.metrics_url)
    assert value(pe, "congress_pe_synced") == 1 and value(pe, "congress_pe_rules") == 1
    assert value(pe, "congress_pe_table_rows", datasource="feed", table="items") == 20
    assert value(pe, "congress_pe_table_lag", datasource="feed", table="items") == 0
    assert value(pe, "congress_pe_diff_eval_seconds_count") >= 20
    assert value(pe, "congress_pe_full_syncs_total") >= 1
    assert value(pe, "congress_bus_connected") == 1 and value(pe, "congress_bus_reconnects_total") == 0


def test_a_leader_change_increments_leader_changes(node_cluster, sink):
    extra, port = metrics_extra("dsd")
    _, a, b = setup_stream(node_cluster, sink, dsd_extra=extra)
    url = f"http://127.0.0.1:{port}/metrics"
    leader, survivor = leader_and_survivor(a, b)
    push(leader, 0)
    wait_for(lambda: sink.ids(), 10, what="the first action")
    before = value(scrape(url), "congress_dsd_leader_changes_total")
    leader.signal(signal.SIGKILL)
    after = wait_for(lambda: (s := scrape(url)) and value(s, "congress_dsd_leader_changes_total") > before and s,
                     10, what="a leader change in /metrics")
    assert value(after, "congress_dsd_leader_changes_total") == before + 1
    leaders = [dict(labels)["pe"] for (name, labels), v in after.items() if name == "congress_dsd_leader" and v == 1]
    assert leaders == [survivor.node_id]


def test_requests_count_by_route_template_and_status(node_cluster):
    node_cluster.add("dsd", "d1")
    a = add(node_cluster, "api-pe", "n1")
    assert a.request("POST", "/v1/policies", {"name": "alpha"})[0] == 201
    assert a.request("POST", "/v1/data-sources", {"name": "ds", "driver": "push",
                                                  "config": {"tables": {"t": ["id"]}}})[0] == 201
    before = scrape(a.metrics_url)
    assert a.get("/v1/policies/alpha")[0] == 200
    assert a.get("/v1/policies/nope")[0] == 404
    assert a.request("PUT", "/v1/data-sources/ds/tables/t/rows", [[1]])[0] == 200   # PushFastPath
    assert a.get("/no/such/path")[0] == 404
    after = scrape(a.metrics_url)

    def moved(route, method, status):
        name = "congress_api_requests_total"
        labels = {"route": route, "method": method, "status": status}
        return value(after, name, **labels) - value(before, name, **labels)
    assert moved("/v1/policies/{policy}", "GET", "200") == 1
    assert moved("/v1/policies/{policy}", "GET", "404") == 1
    assert moved("/v1/data-sources/{ds}/tables/{table}/rows", "PUT", "200") == 1
    assert moved("other", "GET", "404") == 1
    assert value(after, "congress_api_request_duration_seconds_count", route="/v1/policies/{policy}",
                 method="GET") - value(before, "congress_api_request_duration_seconds_count",
                                       route="/v1/policies/{policy}", method="GET") == 2
    assert not any("alpha" in str(labels) or "nope" in str(labels) for _, labels in after)


def test_names_follow_the_conventions_and_recording_can_be_off(node_cluster):
    dsd = add(node_cluster, "dsd", "d1")
    a = add(node_cluster, "api-pe", "n1")
    quiet = add(node_cluster, "api-pe", "n2", record=False)
    assert a.request("POST", "/v1/data-sources", {"name": "ds", "driver": "push",
                                                  "config": {"tables": {"t": ["id"]}}})[0] == 201
    assert a.request("PUT", "/v1/data-sources/ds/tables/t/rows", [[1]])[0] == 200
    wait_for(lambda: value(scrape(a.metrics_url), "congress_pe_table_seq", datasource="ds", table="t") >= 2, 15,
             what="the pushed row applied")
    # the lag is exported once a DSD heartbeat has named the table's version (every heartbeat interval)
    lag = ("congress_pe_table_lag", (("datasource", "ds"), ("table", "t")))
    wait_for(lambda: lag in scrape(a.metrics_url), 15, what="the table's lag exported")
    assert a.get("/v1/policies")[0] == 200 and quiet.get("/v1/policies")[0] == 200
    exported = {s.name for f in text_string_to_metric_families(status_metrics.render(captured_report()))
                for s in f.samples}
    for url in (dsd.metrics_url, a.metrics_url):
        text = scrape_text(url)
        check_conventions(text)
        assert "process_cpu_seconds_total" in text and "python_gc_collections_total" in text
        exported |= {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    dashboard = (REPO / "docs" / "grafana-congressctl.json").read_text()
    used = set(re.findall(r'(?<!["\w])(?:congress|process)_[a-z0-9_]+', dashboard))   # not HAProxy's proxy names
    assert used and used <= exported, f"the dashboard reads what no node exports: {sorted(used - exported)}"
    off = scrape(quiet.metrics_url)
    assert value(off, "congress_pe_synced") == 1   # read at scrape time: served whatever `record` says
    assert not any(name == "congress_api_requests_total" for name, _ in off)
    assert value(off, "congress_pe_diff_eval_seconds_count") == 0
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(a.metrics_url.replace("/metrics", "/v1/policies"), timeout=5)
    assert err.value.code == 404


def test_a_metrics_port_in_use_leaves_the_node_running(node_cluster):
    taken = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen(1)
        a = node_cluster.add("api-pe", "n1", extra={"metrics": {"bind": "127.0.0.1", "api_pe_port": taken}})
        assert a.get("/healthz")[0] == 200
        assert "metrics not served on 127.0.0.1" in a.log_text()


# ---------------------------------------------------------------------------------------------- inventory


def test_inventory_metrics_ports_default_render_and_refuse_clashes(tmp_path):
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(inventory.generate(3)))
    inv = inventory.load_inventory(path)
    assert (inv.metrics.api_pe_port, inv.metrics.dsd_port, inv.metrics.haproxy_port) == (9108, 9109, 8405)
    node = inv.nodes[0]
    config = yaml.safe_load({f.name: f.content for f in render.render_node(inv, node)}["congress.yaml"])
    assert config["metrics"] == {"bind": node.address, "api_pe_port": 9108, "dsd_port": 9109}
    data = inventory.generate(3)
    data["metrics"] = {"dsd_port": data["api"]["port"], "haproxy_port": 9108}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(inventory.InventoryError) as err:
        inventory.load_inventory(path)
    text = str(err.value)
    assert "metrics.dsd_port 1789 clashes with api.port" in text
    assert "metrics.haproxy_port 9108 clashes with metrics.api_pe_port" in text


# ---------------------------------------------------------------------------------------------- HAProxy


def test_haproxys_exporter_answers_on_the_rendered_config(tmp_path):
    """The rendered haproxy.cfg of a node on 127.0.0.x (every such address is this host's), run by a real
    haproxy; only its stats socket moves to a temporary directory."""
    haproxy = require_tool("haproxy")
    data = inventory.generate(3, subnet="127.0.0")
    data["api"]["port"] = free_port()
    data["api"]["tls"] = False   # the exporter is what is tested here; the TLS hops have tests of their own
    data["metrics"] = {"haproxy_port": free_port(), "api_pe_port": free_port(), "dsd_port": free_port()}
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(data))
    inv = inventory.load_inventory(path)
    node = inv.nodes[0]
    files = {f.name: f.content.decode() for f in render.render_node(inv, node)}
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(files["haproxy.cfg"].replace("/run/haproxy/admin.sock", str(tmp_path / "admin.sock")))
    proc = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://{node.address}:{inv.metrics.haproxy_port}/metrics"
        text = wait_for(lambda: scrape_text(url), 10, what="HAProxy's exporter")
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {"haproxy_process_uptime_seconds", "haproxy_frontend_http_requests"} & names
        backends = [s for f in text_string_to_metric_families(text) if f.name == "haproxy_server_status"
                    for s in f.samples]
        assert {s.labels["server"] for s in backends} >= {n.name for n in inv.nodes}
        assert all("state" in s.labels and s.labels["proxy"] == "congress_api_pe" for s in backends)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url.replace("/metrics", "/"), timeout=5)
        assert err.value.code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------- status


def captured_report() -> status.StatusReport:
    inv = inventory.load_inventory(DATA / "inventory.yaml")
    samples = [status.read_sample(inv, node, (DATA / "probes_healthy" / f"{node.name}.out").read_text(), TOKEN)
               for node in inv.nodes]
    api = status.ApiStatus(url=f"http://{inv.vip.address}:{inv.api_port}/healthz", ok=True, status=200,
                           latency_ms=4.0)
    report = status.assess(inv, samples, api, 0.2)
    # these captures predate the replicated bus: its nodes as two hosts' INFO replication would read
    report.bus = status.bus_status(inv, [
        status.BusNodeStatus(node="n1", role="master", offset=900, in_sync=1, replica_offsets={
            inv.node("n2").address: 800}),
        status.BusNodeStatus(node="n2", role="replica", link="up", offset=800)])
    return report


def test_status_output_prometheus_is_the_cluster_view():
    report = captured_report()
    api = report.api
    text = status_metrics.render(report)
    check_conventions(text)
    samples_of = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for f in text_string_to_metric_families(text) for s in f.samples}
    assert value(samples_of, "congress_cluster_health", health="healthy") == 1
    assert value(samples_of, "congress_cluster_health", health="degraded") == 0
    assert value(samples_of, "congress_cluster_quorate") == 1
    assert value(samples_of, "congress_cluster_dsd_leader", pe=report.dsd.leader["node"]) == 1
    assert value(samples_of, "congress_cluster_dsd_placed", host=report.dsd.running_on[0]) == 1
    for h in report.hosts:
        for b in h.backends:
            assert value(samples_of, "congress_cluster_haproxy_backend_up", host=h.name, server=b.server) == 1
        assert value(samples_of, "congress_cluster_host_online", host=h.name) == 1
    assert value(samples_of, "congress_cluster_api_latency_seconds", url=api.url) == 0.004
    assert value(samples_of, "congress_cluster_bus_promoted", node="n1") == 1
    assert value(samples_of, "congress_cluster_bus_replica_lag_bytes", node="n2") == 100
    assert value(samples_of, "congress_cluster_bus_replicas_in_sync") == 1
    assert value(samples_of, "congress_cluster_bus_replica_link_up", node="n2") == 1
