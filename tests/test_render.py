"""Rendering: deterministic bytes, the right structure per role, secrets only where they belong."""

from __future__ import annotations

import filecmp
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml
from click.testing import CliRunner

from congressctl.cli import main
from congressctl.inventory import generate, load_inventory, parse_inventory
from congressctl.node.config import load_node_config
from congressctl.render import Secrets, render_all, render_cib, render_node

EXAMPLE = Path(__file__).resolve().parent.parent / "inventory.example.yaml"


def _inv(tmp_path: Path, nodes: int, **kw):
    return parse_inventory(yaml.safe_dump(generate(nodes, **kw)), tmp_path / "inv.yaml")


def _files(inv, node: str, secrets=None) -> dict[str, bytes]:
    return {f.path: f.content for f in render_node(inv, inv.node(node), secrets)}


def test_render_is_byte_identical_across_runs(tmp_path: Path) -> None:
    runner = CliRunner()
    for out in ("a", "b"):
        result = runner.invoke(main, ["render", "-i", str(EXAMPLE), "-o", str(tmp_path / out), "--output", "json"])
        assert result.exit_code == 0, result.output
    cmp = filecmp.dircmp(tmp_path / "a", tmp_path / "b")
    assert sorted(cmp.left_list) == ["cib.xml", "n1", "n2", "n3"]
    for sub in ["."] + ["n1", "n2", "n3"]:
        a, b = tmp_path / "a" / sub, tmp_path / "b" / sub
        names = sorted(p.name for p in a.iterdir() if p.is_file())
        match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
        assert not mismatch and not errors and match


def test_corosync_nodelist_and_two_node(tmp_path: Path) -> None:
    three = _inv(tmp_path, 3)
    conf = _files(three, "n1")["/etc/corosync/corosync.conf"].decode()
    assert conf.count("ring0_addr:") == 3 and "name: n3" in conf and "nodeid: 3" in conf
    assert "two_node" not in conf
    two = _inv(tmp_path, 2, dsd=2)
    assert "two_node: 1" in _files(two, "n1")["/etc/corosync/corosync.conf"].decode()


def test_haproxy_backends_are_the_api_pe_nodes(tmp_path: Path) -> None:
    inv = _inv(tmp_path, 5, api_pe=3)
    cfg = _files(inv, "n1")["/etc/haproxy/haproxy.cfg"].decode()
    assert f"bind {inv.vip.address}:1789" in cfg
    servers = [line.split()[1] for line in cfg.splitlines() if line.strip().startswith("server ")]
    assert servers == ["n3", "n4", "n5"]
    for needle in ("option httpchk GET /healthz", "option redispatch", "retries 3", "retry-on ",
                   "stats socket /run/haproxy/admin.sock"):
        assert needle in cfg


def test_node_config_points_at_the_bus(tmp_path: Path) -> None:
    inv = _inv(tmp_path, 3, bus=1)
    config = yaml.safe_load(_files(inv, "n2")["/etc/congressctl/congress.yaml"])
    assert config["node_id"] == "n2" and config["api"] == {"bind": "10.213.0.12", "port": 1789}
    assert config["bus"]["host"] == "10.213.0.11" and config["bus"]["password_file"].endswith("bus.password")
    multi = _inv(tmp_path, 5, bus=3)
    assert yaml.safe_load(_files(multi, "n4")["/etc/congressctl/congress.yaml"])["bus"]["host"] == multi.bus.vip


def test_node_processes_output_and_their_own_log_are_different_files(tmp_path: Path) -> None:
    """The OCF agents send a node's stdout/stderr (which carries its log lines too) to `logfile`: were that the
    node's own <log_dir>/<role>.log, every line would be written there twice."""
    inv = _inv(tmp_path, 3)
    log_dir = yaml.safe_load(_files(inv, "n1")["/etc/congressctl/congress.yaml"])["paths"]["log_dir"]
    root = ET.fromstring(render_cib(inv))
    for resource, role in (("api-pe", "api-pe"), ("dsd", "dsd")):
        params = {n.get("name"): n.get("value") for n in root.find(f".//primitive[@id='{resource}']").iter("nvpair")}
        assert params["logfile"].startswith(log_dir + "/") and params["logfile"] != f"{log_dir}/{role}.log"


def test_cib_structure(tmp_path: Path) -> None:
    inv = _inv(tmp_path, 5, dsd=3, api_pe=4)
    root = ET.fromstring(render_cib(inv))
    locations = {(c.get("rsc"), c.get("node")): c.get("score") for c in root.iter("rsc_location")}
    assert locations[("api-pe-clone", "n1")] == "-INFINITY"
    assert ("api-pe-clone", "n2") not in locations
    scores = [int(locations[("dsd", n)]) for n in ("n1", "n2", "n3")]
    assert scores == sorted(scores, reverse=True)
    assert locations[("dsd", "n4")] == "-INFINITY"
    group = root.find(".//group[@id='frontend']")
    assert [p.get("id") for p in group.findall("primitive")] == ["vip", "haproxy"]
    props = {n.get("name"): n.get("value") for n in root.find(".//cluster_property_set").iter("nvpair")}
    assert props["stonith-enabled"] == "false" and props["no-quorum-policy"] == "stop"


def test_multi_bus_is_a_promotable_clone_with_a_following_address(tmp_path: Path) -> None:
    inv = _inv(tmp_path, 5, bus=3)
    root = ET.fromstring(render_cib(inv))
    clone = root.find(".//clone[@id='bus-clone']")
    meta = {n.get("name"): n.get("value") for n in clone.find("meta_attributes")}
    assert meta["promotable"] == "true" and meta["promoted-max"] == "1"
    coloc = root.find(".//rsc_colocation[@id='bus-vip-with-promoted']")
    assert coloc.get("with-rsc-role") == "Promoted"
    single = ET.fromstring(render_cib(_inv(tmp_path, 3, bus=1)))
    assert single.find(".//clone[@id='bus-clone']") is None and single.find(".//primitive[@id='bus']") is not None


def test_multi_bus_runs_congress_bus_promoted_elsewhere_on_failure(tmp_path: Path) -> None:
    inv = _inv(tmp_path, 3, bus=3)
    root = ET.fromstring(render_cib(inv))
    clone = root.find(".//clone[@id='bus-clone']")
    meta = {n.get("name"): n.get("value") for n in clone.find("meta_attributes")}
    assert meta["migration-threshold"] == "1" and meta["notify"] == "true" and meta["failure-timeout"]
    bus = clone.find("primitive[@id='bus']")
    assert (bus.get("provider"), bus.get("type")) == ("congressctl", "congress-bus")
    params = {n.get("name"): n.get("value") for n in bus.find("instance_attributes")}
    assert params["bus_address"] == inv.bus.vip and params["port"] == "6379"
    assert params["peers"] == "n1=10.213.0.11 n2=10.213.0.12 n3=10.213.0.13"
    assert params["password_file"] == "/etc/congressctl/bus.password"
    monitors = {op.get("role"): op.get("interval") for op in bus.iter("op") if op.get("name") == "monitor"}
    assert monitors == {"Promoted": "1s", "Unpromoted": "2s"}
    assert {op.get("name") for op in bus.iter("op")} >= {"promote", "demote", "notify"}
    scores = [int(c.get("score")) for c in root.iter("rsc_colocation") if "apart" in c.get("id")]
    assert len(scores) == 3 and all(-inv.pacemaker.resource_stickiness < s < 0 for s in scores)
    single = ET.fromstring(render_cib(_inv(tmp_path, 3, bus=1)))
    assert single.find(".//primitive[@id='bus']").get("type") == "redis"
    assert not [c for c in single.iter("rsc_colocation") if "apart" in c.get("id")]


def test_redis_conf_of_several_bus_nodes_refuses_writes_without_replicas(tmp_path: Path) -> None:
    multi = _inv(tmp_path, 3, bus=3)
    conf = _files(multi, "n2")["/etc/congressctl/redis.conf"].decode()
    for needle in ("replica-read-only yes", "min-replicas-to-write 1", "min-replicas-max-lag 2",
                   "repl-diskless-sync yes"):
        assert needle in conf.splitlines()
    data = generate(3, bus=3)
    data["bus"]["sync_replicas"] = 2
    two = parse_inventory(yaml.safe_dump(data), tmp_path / "inv.yaml")
    assert "min-replicas-to-write 2" in _files(two, "n1")["/etc/congressctl/redis.conf"].decode()
    single = _files(_inv(tmp_path, 3, bus=1), "n1")["/etc/congressctl/redis.conf"].decode()
    assert "min-replicas" not in single and "replica-read-only" not in single


def test_corosync_realtime_scheduling_is_corosyncs_default_unless_the_inventory_turns_it_off(tmp_path: Path) -> None:
    def conf(**kw) -> str:
        inv = _inv(tmp_path, 3, **kw)
        return next(f.content.decode() for f in render_all(inv)["n1"] if f.path.endswith("corosync.conf"))
    assert "sched_rr" not in conf()
    assert "system {\n    sched_rr: no\n}" in conf(sched_rr=False)


def test_fence_device_values_are_escaped_in_xml(tmp_path: Path) -> None:
    data = generate(3)
    data["pacemaker"]["fencing"] = {"devices": [{"name": "ipmi", "agent": "fence_ipmilan", "hosts": ["n1"],
                                                 "params": {"ip": "10.0.0.5", "username": "admin"}}]}
    inv = parse_inventory(yaml.safe_dump(data), tmp_path / "inv.yaml")
    root = ET.fromstring(render_cib(inv))
    fence = root.find(".//primitive[@id='fence-ipmi']")
    assert fence.get("class") == "stonith" and fence.get("type") == "fence_ipmilan"
    assert {n.get("name"): n.get("value") for n in fence.iter("nvpair")}["pcmk_host_list"] == "n1"
    assert not any("fencing is disabled" in w for w in inv.warnings)


def test_secrets_only_in_secret_files(tmp_path: Path) -> None:
    inv = load_inventory(EXAMPLE)
    secret = Secrets(bus_password="s3cr3t-pass-word", corosync_authkey=b"k" * 256)
    public = render_all(inv)
    assert all(b"s3cr3t" not in f.content for files in public.values() for f in files)
    deployed = render_node(inv, inv.node("n1"), secret)
    carrying = {f.path: f for f in deployed if b"s3cr3t-pass-word" in f.content}
    assert set(carrying) == {"/etc/congressctl/redis.conf", "/etc/congressctl/bus.password"}
    assert all(f.secret and f.mode == 0o600 for f in carrying.values())
    authkey = next(f for f in deployed if f.path == "/etc/corosync/authkey")
    assert authkey.secret and authkey.mode == 0o400


def test_max_rows_per_put_goes_from_the_inventory_into_the_node_config(tmp_path: Path) -> None:
    doc = generate(3)
    doc["api"] = {**doc.get("api", {}), "max_rows_per_put": 500}
    inv = parse_inventory(yaml.safe_dump(doc), tmp_path / "inv.yaml")
    assert inv.api.max_rows_per_put == 500
    config = yaml.safe_load(_files(inv, "n1")["/etc/congressctl/congress.yaml"])
    assert config["api"]["max_rows_per_put"] == 500
    (tmp_path / "bus.password").write_text("pw")
    (tmp_path / "bus.password").chmod(0o600)
    config["bus"]["password_file"] = str(tmp_path / "bus.password")
    (tmp_path / "congress.yaml").write_text(yaml.safe_dump(config))
    assert load_node_config(tmp_path / "congress.yaml").api.max_rows_per_put == 500
    unset = yaml.safe_load(_files(_inv(tmp_path, 3), "n1")["/etc/congressctl/congress.yaml"])
    assert "max_rows_per_put" not in unset["api"]
