"""congressctl status: parsing of real captured probe outputs, and the real command against the shared lab."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import free_port, require_tool
from congressctl import lab as labmod
from congressctl import pacemaker, status
from congressctl.inventory import load_inventory
from fixtures_cluster import CLI, congressctl

DATA = Path(__file__).resolve().parent / "data" / "status"
TOKEN = "feedfacecafebeef"  # the token the captures in tests/data/status were made with


# ---------------------------------------------------------------------------------------------- captured outputs


@pytest.fixture(scope="module")
def inv():
    return load_inventory(DATA / "inventory.yaml")


def _samples(inv, capture: str) -> list[status.HostSample]:
    return [status.read_sample(inv, node, (DATA / capture / f"{node.name}.out").read_text(), TOKEN)
            for node in inv.nodes]


def _api_ok(inv) -> status.ApiStatus:
    return status.ApiStatus(url=f"http://{inv.vip.address}:{inv.api_port}/healthz", ok=True, status=200)


def test_probe_sections_of_a_healthy_host(inv) -> None:
    text = (DATA / "probes_healthy" / "n2.out").read_text()
    probes = status.parse_probes(text, TOKEN)
    assert sorted(probes) == ["api", "crm_mon", "haproxy"]
    assert all(p.rc == 0 and p.err.strip() == "" for p in probes.values())
    assert probes["crm_mon"].out.lstrip().startswith("<pacemaker-result")
    assert json.loads(probes["api"].out)["node"] == "n2"


def test_healthy_capture_reads_as_healthy(inv) -> None:
    samples = _samples(inv, "probes_healthy")
    assert all(s.host.reachable and s.view is not None and s.api is not None for s in samples)
    haproxy = [s.host for s in samples if s.host.haproxy]
    assert [h.name for h in haproxy] == ["n2"]
    assert [(b.server, b.status, b.check) for b in haproxy[0].backends] == [
        ("n1", "UP", "L7OK"), ("n2", "UP", "L7OK"), ("n3", "UP", "L7OK")]
    report = status.assess(inv, samples, _api_ok(inv), 0.2)
    assert (report.health, report.exit_code, report.problems) == ("healthy", 0, [])
    assert report.placement.on("haproxy") == ["n2"] and report.placement.on("dsd") == ["n1"]
    assert {h.name: h.dc for h in report.hosts} == {"n1": "n2", "n2": "n2", "n3": "n2"}
    assert {h.name: h.resources for h in report.hosts} == {
        "n1": ["api-pe", "bus", "dsd"], "n2": ["api-pe", "haproxy", "vip"], "n3": ["api-pe"]}
    assert [(n.node, n.role, n.alive, n.synced, n.healthy) for n in report.nodes] == [
        ("n1", "api-pe", True, True, True), ("n2", "api-pe", True, True, True),
        ("n3", "api-pe", True, True, True), ("n1", "dsd", True, None, None)]
    own = {s.host.name: s.api.incarnation for s in samples}
    assert {n.node: n.incarnation for n in report.nodes if n.role == "api-pe"} == own
    assert report.dsd.node == "n1" and report.dsd.running_on == ["n1"] and report.dsd.leader["node"] == "n2"
    assert [(t.table, t.epoch, t.seq, t.lag) for t in report.dsd.tables] == [
        ("ds1:t", 1, 2, {"n1": 0, "n2": 0, "n3": 0})]
    assert json.loads(json.dumps(report.to_dict()))["dsd"]["leader"]["node"] == "n2"


def test_banned_api_pe_capture_reads_as_degraded_naming_the_node(inv) -> None:
    report = status.assess(inv, _samples(inv, "probes_api_pe_banned_n3"), _api_ok(inv), 0.2)
    assert (report.health, report.exit_code) == ("degraded", 1)
    assert "api-pe on n1, n2, expected n1, n2, n3" in report.problems
    assert "haproxy backend n3 is DOWN" in report.problems
    assert any(p.startswith("api-pe on n3 does not answer /v1/status (curl: (7)") for p in report.problems)
    assert any(p.startswith("api-pe on n3: last heartbeat") for p in report.problems)
    n3 = next(n for n in report.nodes if (n.node, n.role) == ("n3", "api-pe"))
    assert (n3.answered, n3.alive, n3.expected) == (False, False, True)


def test_unreachable_host_is_degraded_and_no_api_is_unavailable(inv) -> None:
    samples = _samples(inv, "probes_healthy")
    samples[2] = status.HostSample(status.HostStatus(name="n3", address="10.213.48.13", error="timed out"))
    report = status.assess(inv, samples, _api_ok(inv), 5.0)
    assert (report.health, report.exit_code) == ("degraded", 1)
    assert report.problems == ["n3: unreachable (timed out)"]
    down = status.ApiStatus(url="http://x/healthz", error="cannot connect: refused")
    report = status.assess(inv, _samples(inv, "probes_healthy"), down, 0.2)
    assert (report.health, report.exit_code) == ("unavailable", 2)
    assert report.problems == ["API through the VIP http://x/healthz: cannot connect: refused"]


def test_crm_mon_error_of_a_host_without_pacemaker() -> None:
    root = ET.fromstring((DATA / "crm_mon_not_running.xml").read_text())
    assert "Connection to cluster failed" in pacemaker.crm_mon_error(root)
    assert pacemaker.cluster_dc(root) is None


def test_probe_command_runs_in_a_real_shell_and_reads_failures(inv) -> None:
    """The probe script itself, here: no HAProxy socket is expected and the api-pe port is closed."""
    for tool in ("crm_mon", "curl", "socat", "timeout"):
        require_tool(tool)
    url = f"http://127.0.0.1:{free_port()}/v1/status"
    proc = subprocess.run(status.probe_command(TOKEN, url, 3), shell=True, capture_output=True, text=True,
                          timeout=20)
    probes = status.parse_probes(proc.stdout, TOKEN)
    assert sorted(probes) == ["api", "crm_mon", "haproxy"]
    assert probes["api"].rc == 7 and "curl: (7)" in probes["api"].err
    local_crm_mon = subprocess.run(["crm_mon", "-1", "--output-as=xml"], capture_output=True, timeout=20)
    assert probes["crm_mon"].rc == local_crm_mon.returncode


# ---------------------------------------------------------------------------------------------- the shared lab


def _exec(cluster, host: str, *argv: str) -> str:
    proc = labmod.lab_exec(cluster.lab, host, list(argv), timeout=60)
    out = proc.stdout.decode() if isinstance(proc.stdout, bytes) else proc.stdout
    assert proc.returncode == 0, f"{argv} on {host}: {proc.stderr}"
    return out


def _status_json(cluster) -> tuple[int, dict]:
    proc = congressctl("status", "-i", str(cluster.inventory_path), "--output", "json", timeout=60)
    assert proc.returncode in (0, 1, 2), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _wait_for(cluster, exit_code: int, limit_s: float, also=lambda report: True) -> dict:
    deadline = time.monotonic() + limit_s
    while True:
        code, report = _status_json(cluster)
        if code == exit_code and also(report):
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"status did not reach exit {exit_code} in {limit_s:g}s; last exit {code}, "
                                 f"problems: {report['problems']}")
        time.sleep(1)


@pytest.mark.lab
def test_healthy_cluster_matches_crm_mon_and_the_nodes(cluster) -> None:
    report = _wait_for(cluster, 0, 60)
    assert report["health"] == "healthy" and report["problems"] == []
    placement = pacemaker.parse_crm_mon(_exec(cluster, "n1", "crm_mon", "-1", "--output-as=xml"))
    assert report["placement"]["running"] == placement.running
    assert sorted(report["placement"]["online"]) == sorted(n.name for n in cluster.inv.nodes)
    for host in report["hosts"]:
        assert host["reachable"] and host["online"] and host["quorum"]
        assert host["resources"] == sorted(f"{r} (promoted)" if host["name"] in placement.promoted.get(r, []) else r
                                           for r, on in placement.running.items() if host["name"] in on)
    vip_host = next(h for h in report["hosts"] if h["name"] in placement.on("haproxy"))
    assert sorted(b["server"] for b in vip_host["backends"] if b["status"] == "UP") == sorted(
        n.name for n in cluster.inv.with_role("api-pe"))
    own = {n.name: httpx.get(f"{cluster.inv.api_url(n.address)}/v1/status", timeout=5, headers=cluster.headers,
                             verify=cluster.verify).json()
           for n in cluster.inv.with_role("api-pe")}
    assert report["dsd"]["node"] == placement.on("dsd")[0] == report["dsd"]["running_on"][0]
    assert {s["dsd"]["node"] for s in own.values()} == {report["dsd"]["node"]}
    assert {s["dsd"]["leader"]["node"] for s in own.values()} == {report["dsd"]["leader"]["node"]}
    for node in report["nodes"]:
        if node["role"] == "api-pe":
            assert node["incarnation"] == own[node["node"]]["incarnation"]
            assert node["answered"] and node["synced"] and node["healthy"] and node["alive"]
    assert report["api"]["ok"] and report["api"]["status"] == 200
    bus = report["bus"]
    assert bus["promoted"] == placement.promoted["bus"] and len(bus["promoted"]) == 1
    assert bus["replicated"] and bus["in_sync"] == len(cluster.inv.with_role("bus")) - 1
    assert sorted(n["node"] for n in bus["nodes"]) == sorted(n.name for n in cluster.inv.with_role("bus"))
    for node in bus["nodes"]:
        assert node["role"] == ("master" if node["node"] in bus["promoted"] else "replica"), node
        assert node["role"] == "master" or (node["link"] == "up" and node["lag_bytes"] is not None), node


@pytest.mark.lab
def test_stopped_api_pe_is_degraded_naming_its_node_then_recovers(cluster) -> None:
    report = _wait_for(cluster, 0, 60)
    vip_host = report["placement"]["running"]["vip"][0]
    leader = report["dsd"]["leader"]["node"]
    victim = next(n.name for n in cluster.inv.with_role("api-pe") if n.name not in (vip_host, leader))
    other = next(n.name for n in cluster.inv.nodes if n.name != victim)
    _exec(cluster, other, "crm_resource", "--resource", "api-pe-clone", "--ban", "--node", victim)
    try:
        degraded = _wait_for(cluster, 1, 30, lambda r: victim not in r["placement"]["running"]["api-pe"]
                             and f"haproxy backend {victim} is DOWN" in r["problems"])
        assert degraded["health"] == "degraded" and degraded["api"]["ok"]
        assert any(p.startswith(f"api-pe on {victim} does not answer") for p in degraded["problems"])
        expected = ", ".join(sorted(n.name for n in cluster.inv.with_role("api-pe")))
        running = ", ".join(degraded["placement"]["running"]["api-pe"])
        assert f"api-pe on {running}, expected {expected}" in degraded["problems"]
        table = congressctl("status", "-i", str(cluster.inventory_path), timeout=60)
        assert table.returncode == 1
        assert "degraded" in table.stdout and f"haproxy backend {victim} is DOWN" in table.stdout
    finally:
        _exec(cluster, other, "crm_resource", "--resource", "api-pe-clone", "--clear", "--node", victim)
        _wait_for(cluster, 0, 90)


@pytest.mark.lab
def test_no_reachable_host_is_unavailable(cluster, tmp_path: Path) -> None:
    """Every host's key unknown: nothing is reachable (exit 2), and nothing is written to known_hosts."""
    data = yaml.safe_load(cluster.inventory_path.read_text())
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    data["ssh"]["known_hosts"] = str(empty)
    data["ssh"]["key"] = str((cluster.inventory_path.parent / data["ssh"]["key"]).resolve())
    data["state_dir"] = str(cluster.inv.state_dir)   # where the cluster CA is
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = congressctl("status", "-i", str(path), "--output", "json", timeout=60)
    assert proc.returncode == 2, proc.stderr
    report = json.loads(proc.stdout)
    assert report["health"] == "unavailable" and report["api"]["ok"]
    assert all(not h["reachable"] and "host key" in h["error"] for h in report["hosts"])
    assert [p for p in report["problems"] if "unreachable" in p] == [
        f"{n.name}: unreachable ({h['error']})" for n, h in zip(cluster.inv.nodes, report["hosts"])]
    assert empty.read_text() == ""


@pytest.mark.lab
def test_watch_prints_samples_until_interrupted(cluster) -> None:
    _wait_for(cluster, 0, 60)
    proc = subprocess.Popen(CLI + ["status", "-i", str(cluster.inventory_path), "--watch", "1", "--output", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    samples = [json.loads(line) for line in lines + out.splitlines() if line.strip()]
    assert len(samples) >= 2 and all(s["health"] == "healthy" for s in samples)
    assert proc.returncode == 0, err
