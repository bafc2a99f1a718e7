"""Rendered files checked by the real tools: corosync -t, haproxy -c, crm_verify and crm_simulate drills."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import require, require_tool
from congressctl.cli import main
from congressctl.errors import ToolFailedError
from congressctl.inventory import generate, load_inventory, parse_inventory
from congressctl import verify
from congressctl.render import render_all, render_cib

EXAMPLE = Path(__file__).resolve().parent.parent / "inventory.example.yaml"

SHAPES = {
    "2-nodes": dict(nodes=2, dsd=2),
    "3-nodes-one-dsd-spare": dict(nodes=3, dsd=2, api_pe=2),
    "3-nodes-no-realtime": dict(nodes=3, dsd=3, sched_rr=False),
    "5-nodes-3-bus": dict(nodes=5, dsd=3, bus=3, api_pe=3),
    "3-nodes-3-bus": dict(nodes=3, dsd=3, bus=3),
    "2-nodes-2-bus": dict(nodes=2, dsd=2, bus=2),
    "7-nodes": dict(nodes=7, dsd=4, api_pe=5),
}


@pytest.fixture(autouse=True)
def tools() -> None:
    for tool in verify.TOOLS:
        require_tool(tool)
    require(os.geteuid() == 0, "corosync -t checks need root for a throwaway network namespace")


def _inv(tmp_path: Path, shape: dict):
    return parse_inventory(yaml.safe_dump(generate(**shape)), tmp_path / "inv.yaml")


@pytest.mark.parametrize("shape", list(SHAPES.values()) + [None], ids=list(SHAPES) + ["example"])
def test_every_rendered_file_passes_its_tool(shape, tmp_path: Path) -> None:
    inv = load_inventory(EXAMPLE) if shape is None else _inv(tmp_path, shape)
    results = verify.verify_all(inv, render_all(inv), render_cib(inv))
    failed = [r for r in results if not r.ok]
    assert not failed, failed
    tools = {r.tool for r in results}
    assert tools == {"corosync -t", "haproxy -c", "crm_verify", "crm_simulate"}
    assert sum(r.tool == "corosync -t" for r in results) == len(inv.nodes)
    drills = {r.target.split(" (")[-1] for r in results if r.tool == "crm_simulate"}
    assert {"all nodes up", "DSD node)", "VIP node)"} <= drills
    if len(inv.with_role("bus")) > 1:
        assert "promoted bus)" in drills


def test_simulated_placement_follows_the_design(tmp_path: Path) -> None:
    inv = _inv(tmp_path, SHAPES["5-nodes-3-bus"])
    cib = render_cib(inv)
    names = [n.name for n in inv.nodes]
    up = verify.simulate(cib, names)
    assert up.on("dsd") == ["n1"]
    assert up.on("api-pe") == ["n3", "n4", "n5"]
    assert up.on("vip") == up.on("haproxy") and len(up.on("vip")) == 1
    assert len(up.promoted["bus"]) == 1 and up.on("bus-vip") == up.promoted["bus"]
    assert set(up.on("bus")) == {"n1", "n2", "n3"}
    after = verify.simulate(cib, names, ["n1"])
    assert after.on("dsd") == ["n2"]
    promoted = up.promoted["bus"][0]
    moved = verify.simulate(cib, names, [promoted])
    assert moved.promoted["bus"] != [promoted] and moved.on("bus-vip") == moved.promoted["bus"]


@pytest.mark.parametrize("shape", ["3-nodes-3-bus", "5-nodes-3-bus"])
def test_promoted_bus_dsd_and_vip_keep_apart_and_any_one_host_can_fail(shape, tmp_path: Path) -> None:
    inv = _inv(tmp_path, SHAPES[shape])
    cib = render_cib(inv)
    names = [n.name for n in inv.nodes]
    up = verify.simulate(cib, names)
    hosts = {"bus": up.promoted["bus"], "dsd": up.on("dsd"), "vip": up.on("vip")}
    assert all(len(h) == 1 for h in hosts.values()) and len({h[0] for h in hosts.values()}) == 3, hosts
    for failed in names:
        after = verify.simulate(cib, names, [failed])
        survivors = [n for n in names if n != failed]
        assert len(after.promoted.get("bus", [])) == 1 and after.on("bus-vip") == after.promoted["bus"], failed
        assert len(after.on("dsd")) == 1 and after.on("vip") == after.on("haproxy") and after.on("vip"), failed
        assert after.on("api-pe") == sorted(n.name for n in inv.with_role("api-pe") if n.name != failed)
        assert set(after.on("bus")) == {n.name for n in inv.with_role("bus")} & set(survivors)
        assert not after.failed and failed not in {h for hosts in after.running.values() for h in hosts}


def test_with_two_hosts_apart_resources_share_one_and_nothing_stops(tmp_path: Path) -> None:
    inv = _inv(tmp_path, SHAPES["2-nodes-2-bus"])
    cib = render_cib(inv)
    for failed in ("n1", "n2"):
        after = verify.simulate(cib, ["n1", "n2"], [failed])
        survivor = "n2" if failed == "n1" else "n1"
        assert after.promoted["bus"] == after.on("bus-vip") == after.on("dsd") == after.on("vip") == [survivor]


def test_corosync_check_refuses_a_node_not_in_the_file(tmp_path: Path) -> None:
    inv = _inv(tmp_path, SHAPES["2-nodes"])
    conf = next(f.content for f in render_all(inv)["n1"] if f.name == "corosync.conf")
    assert verify.check_corosync(conf, inv.node("n1").address, "n1").ok
    wrong = verify.check_corosync(conf, "10.213.0.99", "n1")
    assert not wrong.ok and "exit" in wrong.detail


def test_tools_refuse_broken_files(tmp_path: Path) -> None:
    inv = _inv(tmp_path, SHAPES["2-nodes"])
    files = {f.name: f.content for f in render_all(inv)["n1"]}
    broken_cfg = files["haproxy.cfg"].replace(b"balance roundrobin", b"balance nonsense")
    assert not verify.check_haproxy(broken_cfg, "n1").ok
    broken_conf = files["corosync.conf"].replace(b"transport: knet", b"transport: carrier-pigeon")
    assert not verify.check_corosync(broken_conf, inv.node("n1").address, "n1").ok
    broken_cib = render_cib(inv).replace(b'type="IPaddr2"', b'typo="IPaddr2"', 1)
    assert not verify.check_cib(broken_cib).ok


def test_placement_drill_catches_vip_and_haproxy_apart(tmp_path: Path) -> None:
    inv = _inv(tmp_path, SHAPES["3-nodes-one-dsd-spare"])
    cib = render_cib(inv).replace(b'<group id="frontend">', b"").replace(b"</group>", b"")
    cib = re.sub(rb'<rsc_location id="frontend-prefers-[^>]*/>', b"", cib)
    cib = re.sub(rb'<rsc_colocation [^>]*"frontend"[^>]*/>', b"", cib)      # the group is gone
    cib = cib.replace(b'<rsc_order id="bus-before-api-pe"',
                      b'<rsc_colocation id="apart" rsc="haproxy" with-rsc="vip" score="-INFINITY"/>\n'
                      b'      <rsc_order id="bus-before-api-pe"')
    assert verify.check_cib(cib).ok
    results = verify.check_placements(inv, cib)
    assert not next(r for r in results if r.target == "all nodes up").ok


def test_validate_command_runs_the_tools(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["validate", "-i", str(EXAMPLE), "--output", "json"])
    assert result.exit_code == 0, result.output
    rows = yaml.safe_load(result.stdout)
    assert {r["check"] for r in rows} >= {"inventory", "corosync -t", "haproxy -c", "crm_verify", "crm_simulate"}
    assert all(r["ok"] for r in rows)


def _my_namespaces() -> list[Path]:
    return list(Path("/run/netns").glob(f"cctl-check-{os.getpid()}-*"))


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_a_tool_failing_on_its_own_is_a_named_error_not_a_refused_file(tmp_path: Path) -> None:
    inv = _inv(tmp_path, SHAPES["2-nodes"])
    conf = next(f.content for f in render_all(inv)["n1"] if f.name == "corosync.conf")
    with pytest.raises(ToolFailedError) as raised:
        verify.check_corosync(conf, "not-an-address", "n1")   # `ip addr add` refuses it
    assert re.fullmatch(r"`ip -n cctl-check-\d+-\d+ addr add not-an-address/32 dev lo` failed \(exit 1\): "
                        r"Error: any valid prefix is expected rather than \"not-an-address/32\"\.", str(raised.value))
    assert raised.value.exit_code == 2
    assert not _my_namespaces()


def test_validate_reports_a_failed_tool_in_one_line_and_exits_2(monkeypatch) -> None:
    """A namespace of the check's name already exists, so `ip netns add` really fails."""
    monkeypatch.setattr(verify, "_netns_serial", itertools.count(900_000))
    taken = f"cctl-check-{os.getpid()}-900000"
    subprocess.run(["ip", "netns", "add", taken], check=True)
    try:
        result = CliRunner().invoke(main, ["validate", "-i", str(EXAMPLE)])
    finally:
        subprocess.run(["ip", "netns", "del", taken], capture_output=True)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert _errors(result.output) == [f"error: `ip netns add {taken}` failed (exit 1): Cannot create namespace "
                                      f'file "/run/netns/{taken}": File exists'], result.output
    assert "Traceback" not in result.output


def test_validate_reports_a_tool_out_of_time_in_one_line_and_exits_2(monkeypatch) -> None:
    monkeypatch.setattr(verify, "TOOL_TIMEOUT_S", 1e-6)
    result = CliRunner().invoke(main, ["validate", "-i", str(EXAMPLE)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    errors = _errors(result.output)
    assert len(errors) == 1 and re.fullmatch(r"error: `ip netns add cctl-check-\d+-\d+` did not finish within "
                                             r"1e-06 s \(killed\)", errors[0]), result.output
    assert "Traceback" not in result.output
    assert not _my_namespaces()
