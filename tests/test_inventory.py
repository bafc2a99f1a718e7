"""The inventory model: a good inventory loads; each bad one is refused naming file, line, field and what
was expected; nothing is rendered for a bad one (checked through the CLI)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from congressctl.cli import main
from congressctl.errors import InventoryError, UnknownNodeError
from congressctl.inventory import generate, load_inventory, parse_inventory

GOOD = textwrap.dedent("""\
    cluster: demo
    nodes:
      - name: n1
        address: 10.213.0.11
        roles: [api-pe, dsd, bus]
      - name: n2
        address: 10.213.0.12
        roles: [api-pe, dsd]
      - name: n3
        address: 10.213.0.13
        roles: [api-pe]
    vip: {address: 10.213.0.100, cidr: 24, interface: eth0}
    api: {port: 1789}
    bus: {port: 6379}
    timings: {heartbeat_interval_ms: 200, peer_timeout_ms: 1000}
    pacemaker: {fencing: disabled, no_quorum_policy: stop}
    dsd: {preference: [n2, n1]}
    ssh: {user: root, port: 22}
    """)

# (case id, text to replace, replacement, needle locating the expected line, field, message fragment)
BAD = [
    ("yaml-syntax", "cluster: demo", "cluster: [demo", None, None, "YAML syntax error"),
    ("yaml-tab-indent", "    address: 10.213.0.12", "\taddress: 10.213.0.12", None, None, "YAML syntax error"),
    ("top-not-mapping", GOOD, "- just\n- a list\n", "- just", None, "expected a mapping"),
    ("unknown-top-key", "cluster: demo", "cluster: demo\nclusterr: x", "clusterr", "clusterr", "did you mean 'cluster'"),
    ("unknown-node-key", "    address: 10.213.0.11", "    adress: 10.213.0.11", "adress", "nodes[0].adress",
     "did you mean 'address'"),
    ("unknown-vip-key", "interface: eth0}", "iface: eth0}", "vip:", "vip.iface", "unknown key 'iface'"),
    ("missing-cluster", "cluster: demo\n", "", "nodes:", "cluster", "required field 'cluster' is missing"),
    ("missing-nodes", "nodes:", "nodez:", "cluster:", "nodes", "required list 'nodes'"),
    ("missing-vip", "vip: {address: 10.213.0.100, cidr: 24, interface: eth0}\n", "", "cluster:", "vip",
     "required section 'vip'"),
    ("missing-address", "    address: 10.213.0.13\n", "", "name: n3", "nodes[2].address", "required field 'address'"),
    ("wrong-type-port", "api: {port: 1789}", "api: {port: high}", "api:", "api.port", "expected int"),
    ("wrong-type-cidr", "cidr: 24", "cidr: '24x'", "vip:", "vip.cidr", "expected int"),
    ("wrong-type-vip", "vip: {address: 10.213.0.100, cidr: 24, interface: eth0}", "vip: [10.213.0.100]", "vip:", "vip",
     "expected a mapping"),
    ("wrong-type-roles", "roles: [api-pe]\n", "roles: api-pe\n", "roles: api-pe", "nodes[2].roles", "expected a list"),
    ("wrong-type-tls", "bus: {port: 6379}", "bus: {port: 6379, tls: maybe}", "bus:", "bus.tls", "expected bool"),
    ("unknown-role", "roles: [api-pe]\n", "roles: [api-pe, dns]\n", "api-pe, dns", "nodes[2].roles[1]",
     "not one of api-pe, dsd, bus"),
    ("misspelled-role", "roles: [api-pe]\n", "roles: [apipe]\n", "apipe", "nodes[2].roles[0]", "did you mean 'api-pe'"),
    ("api-token-inline", "api: {port: 1789}", "api: {port: 1789, tokens: [{name: ci, role: admin, token: abc}]}",
     "api:", "api.tokens[0].token", "never put an API token inline"),
    ("api-token-no-source", "api: {port: 1789}", "api: {port: 1789, tokens: [{name: ci, role: admin}]}", "api:",
     "api.tokens[0]", "give the token's file or its env"),
    ("api-token-both-sources", "api: {port: 1789}",
     "api: {port: 1789, tokens: [{name: ci, role: admin, file: t, env: T}]}", "api:", "api.tokens[0]",
     "give the token's file or its env"),
    ("api-token-bad-role", "api: {port: 1789}", "api: {port: 1789, tokens: [{name: ci, role: root, env: T}]}",
     "api:", "api.tokens[0].role", "not one of admin, reader"),
    ("api-token-generated-name", "api: {port: 1789}",
     "api: {port: 1789, tokens: [{name: admin, role: reader, env: T}]}", "api:", "api.tokens[0].name",
     "the token deploy generates"),
    ("api-token-twice", "api: {port: 1789}",
     "api: {port: 1789, tokens: [{name: ci, role: reader, env: T}, {name: ci, role: admin, env: U}]}", "api:",
     "api.tokens[1].name", "listed twice"),
    ("api-max-body-zero", "api: {port: 1789}", "api: {port: 1789, max_body_mb: 0}", "api:", "api.max_body_mb",
     "must be a positive number"),
    ("api-max-rows-zero", "api: {port: 1789}", "api: {port: 1789, max_rows_per_put: 0}", "api:",
     "api.max_rows_per_put", "must be a positive number"),
    ("api-max-rows-not-int", "api: {port: 1789}", "api: {port: 1789, max_rows_per_put: many}", "api:",
     "api.max_rows_per_put", "expected int"),
    ("allowed-url-host-prefix", "api: {port: 1789}", "api: {port: 1789}\ndatasources: {allowed_urls: ['http://10.0.0.5']}",
     "datasources:", "datasources.allowed_urls[0]", "not a URL prefix that ends its host"),
    ("allowed-url-not-http", "api: {port: 1789}", "api: {port: 1789}\ndatasources: {allowed_urls: ['ftp://h/']}",
     "datasources:", "datasources.allowed_urls[0]", "not a URL prefix"),
    ("allowed-urls-not-list", "api: {port: 1789}", "api: {port: 1789}\ndatasources: {allowed_urls: 'http://h/'}",
     "datasources:", "datasources.allowed_urls", "expected a list"),
    ("duplicate-name", "  - name: n3", "  - name: n2", 9, "nodes[2].name",
     "duplicate node name 'n2'"),
    ("duplicate-address", "address: 10.213.0.13", "address: 10.213.0.12", 10, "nodes[2].address",
     "duplicate address 10.213.0.12"),
    ("invalid-address", "address: 10.213.0.13", "address: 10.213.0.300", "10.213.0.300", "nodes[2].address",
     "not a valid IPv4 address"),
    ("hostname-address", "address: 10.213.0.13", "address: node3.example", "node3.example", "nodes[2].address",
     "not a valid IPv4 address"),
    ("vip-outside-subnet", "address: 10.213.0.100", "address: 192.0.2.10", "192.0.2.10", "vip.address",
     "outside every node's subnet"),
    ("vip-is-node-address", "address: 10.213.0.100", "address: 10.213.0.12", "vip:", "vip.address",
     "node 'n2''s own address"),
    ("vip-is-broadcast", "address: 10.213.0.100", "address: 10.213.0.255", "vip:", "vip.address", "broadcast"),
    ("no-api-pe", GOOD, GOOD.replace("api-pe, ", "").replace("[api-pe]", "[dsd]"), "- name: n1", "nodes", "no node has the 'api-pe' role"),
    ("no-dsd", GOOD, GOOD.replace("dsd, ", "").replace(", dsd]", "]").replace("dsd: {preference: [n2, n1]}\n", ""),
     "- name: n1", "nodes", "no node has the 'dsd' role", ),
    ("no-bus", "roles: [api-pe, dsd, bus]", "roles: [api-pe, dsd]", "- name: n1", "nodes", "no node has the 'bus' role"),
    ("preference-not-dsd", "preference: [n2, n1]", "preference: [n3, n1]", "preference", "dsd.preference[0]",
     "does not have the dsd role"),
    ("preference-unknown", "preference: [n2, n1]", "preference: [n2, nx1]", "preference", "dsd.preference[1]",
     "not a node of this inventory"),
    ("port-clash", "bus: {port: 6379}", "bus: {port: 1789}", "bus:", "bus.port", "clashes with api.port"),
    ("port-corosync", "api: {port: 1789}", "api: {port: 5405}", "api:", "api.port", "used by corosync"),
    ("port-ssh", "api: {port: 1789}", "api: {port: 22}", "api:", "api.port", "SSH port"),
    ("port-range", "api: {port: 1789}", "api: {port: 70000}", "api:", "api.port", "outside 1..65535"),
    ("name-space", "  - name: n3", "  - name: 'n 3'", "n 3", "nodes[2].name", "not a valid node name"),
    ("name-quote", "  - name: n3", "  - name: 'n3\"'", "n3\"", "nodes[2].name", "not a valid node name"),
    ("name-xml", "  - name: n3", "  - name: '<n3>'", "<n3>", "nodes[2].name", "not a valid node name"),
    ("name-template", "  - name: n3", "  - name: '{{n3}}'", "{{n3}}", "nodes[2].name", "not a valid node name"),
    ("name-newline", "  - name: n3", "  - name: \"n3\\nx\"", "n3\\nx", "nodes[2].name", "not a valid node name"),
    ("cluster-unsafe", "cluster: demo", "cluster: 'demo}; evil'", "cluster:", "cluster", "not a valid cluster name"),
    ("interface-unsafe", "interface: eth0", "interface: 'eth0 x'", "vip:", "vip.interface", "not a valid interface"),
    ("inline-password", "bus: {port: 6379}", "bus: {port: 6379, password: hunter2}", "bus:", "bus.password",
     "never put the bus password inline"),
    ("both-password-sources", "bus: {port: 6379}", "bus: {port: 6379, password_file: p, password_env: P}", "bus:",
     "bus.password_file", "not both"),
    ("multi-bus-no-vip", "roles: [api-pe, dsd]", "roles: [api-pe, dsd, bus]", "bus:", "bus.vip", "set bus.vip"),
    ("timings-peer-too-short", "peer_timeout_ms: 1000", "peer_timeout_ms: 300", "timings:", "timings.peer_timeout_ms",
     "at least twice"),
    ("timings-negative", "heartbeat_interval_ms: 200", "heartbeat_interval_ms: -5", "timings:",
     "timings.heartbeat_interval_ms", "positive"),
    ("no-quorum-policy", "no_quorum_policy: stop", "no_quorum_policy: stopp", "pacemaker:",
     "pacemaker.no_quorum_policy", "did you mean 'stop'"),
    ("fencing-bogus", "fencing: disabled", "fencing: none", "pacemaker:", "pacemaker.fencing", "not one of disabled"),
    ("duplicate-key", "api: {port: 1789}", "api: {port: 1789, port: 1790}", "api:", "api.port", "duplicate key"),
    ("empty-file", GOOD, "", None, None, "empty"),
    ("corosync-sched-rr-type", "ssh: {user: root, port: 22}", "ssh: {user: root, port: 22}\ncorosync: {sched_rr: 0}",
     "corosync:", "corosync.sched_rr", "expected bool"),
    ("corosync-unknown-key", "ssh: {user: root, port: 22}", "ssh: {user: root, port: 22}\ncorosync: {realtime: no}",
     "corosync:", "corosync.realtime", "known keys: sched_rr"),
    ("ssh-port-type", "ssh: {user: root, port: 22}", "ssh: {user: root, port: [22]}", "ssh:", "ssh.port",
     "expected int"),
]


def _mutate(old: str, new: str) -> str:
    assert old in GOOD, f"test case does not apply: {old!r}"
    return GOOD.replace(old, new, 1)


def _line_of(text: str, needle: str | int) -> int:
    if isinstance(needle, int):
        return needle
    for number, line in enumerate(text.splitlines(), start=1):
        if needle.splitlines()[0] in line:
            return number
    raise AssertionError(f"needle {needle!r} not in text")


def test_good_inventory_loads(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(GOOD)
    inv = load_inventory(path)
    assert [n.name for n in inv.nodes] == ["n1", "n2", "n3"]
    assert inv.dsd_preference == ["n2", "n1"]
    assert inv.bus_address == "10.213.0.11"
    assert inv.api_port == 1789 and inv.timings.peer_timeout_ms == 1000
    assert any("fencing is disabled" in w for w in inv.warnings)


def test_api_tokens_limits_and_allowed_urls_load_and_default_to_none_allowed(tmp_path: Path) -> None:
    inv = parse_inventory(GOOD, tmp_path / "inv.yaml")
    assert inv.api.tokens == () and inv.api.max_body_mb == 16 and inv.datasources.allowed_urls == ()
    text = GOOD.replace("api: {port: 1789}", "api: {port: 1789, max_body_mb: 4, tokens: [\n"
                        "    {name: ops, role: reader, file: ops.token}, {name: ci, role: admin, env: CI_TOKEN}]}\n"
                        "datasources: {allowed_urls: ['http://10.213.0.1:', 'https://feeds.example/v2/']}")
    inv = parse_inventory(text, tmp_path / "inv.yaml")
    assert [(t.name, t.role, t.file, t.env) for t in inv.api.tokens] == [("ops", "reader", "ops.token", None),
                                                                      ("ci", "admin", None, "CI_TOKEN")]
    assert inv.api.max_body_mb == 4 and inv.api.max_rows_per_put is None
    assert inv.datasources.allowed_urls == ("http://10.213.0.1:", "https://feeds.example/v2/")


def test_there_are_at_least_thirty_bad_inventories() -> None:
    assert len(BAD) >= 30


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inventory_is_refused_with_line_and_field(case, tmp_path: Path) -> None:
    _, old, new, needle, field, fragment = case
    text = _mutate(old, new)
    with pytest.raises(InventoryError) as info:
        parse_inventory(text, tmp_path / "inv.yaml")
    problems = info.value.problems
    match = [p for p in problems if fragment in p.message]
    assert match, f"no problem mentions {fragment!r}: {[str(p) for p in problems]}"
    problem = match[0]
    assert problem.file.endswith("inv.yaml")
    if field is not None:
        assert problem.field == field, str(problem)
    if needle is not None:
        assert problem.line == _line_of(text, needle), str(problem)
    assert str(problem).startswith(f"{tmp_path / 'inv.yaml'}:")


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    text = _mutate("cluster: demo", "clustr: demo").replace("cidr: 24", "cidr: big")
    with pytest.raises(InventoryError) as info:
        parse_inventory(text, tmp_path / "inv.yaml")
    fields = {p.field for p in info.value.problems}
    assert {"clustr", "vip.cidr", "cluster"} <= fields


def test_two_nodes_get_two_node_and_even_counts_warn(tmp_path: Path) -> None:
    two = parse_inventory(yaml.safe_dump(generate(2, dsd=2)), tmp_path / "a.yaml")
    assert two.two_node and not any("even node count" in w for w in two.warnings)
    four = parse_inventory(yaml.safe_dump(generate(4)), tmp_path / "b.yaml")
    assert not four.two_node and any("even node count" in w for w in four.warnings)
    many = parse_inventory(yaml.safe_dump(generate(40)), tmp_path / "c.yaml")
    assert any("at most 32" in w for w in many.warnings)


def test_cli_refuses_bad_inventory_with_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(_mutate("    address: 10.213.0.11", "    adress: 10.213.0.11"))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["render", "-i", str(path), "-o", str(out)])
    assert result.exit_code == 2
    assert "inv.yaml:4:5: nodes[0].adress: unknown key 'adress'; did you mean 'address'?" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_cli_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["validate", "--no-tools", "-i", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "cannot read inventory" in result.output and "nope.yaml" in result.output


def test_an_unknown_node_name_is_a_named_error_listing_the_known_ones(tmp_path: Path) -> None:
    inv = parse_inventory(GOOD, tmp_path / "inv.yaml")
    assert inv.node("n2").address == "10.213.0.12"
    with pytest.raises(UnknownNodeError) as raised:
        inv.node("n9")
    assert str(raised.value) == f"{tmp_path / 'inv.yaml'}: no node named 'n9'; the inventory has n1, n2, n3"
    assert raised.value.exit_code == 2


def test_sync_replicas_defaults_to_one_with_several_bus_nodes_and_zero_with_one(tmp_path: Path) -> None:
    def inv(bus: int, **settings):
        data = generate(3, bus=bus)
        data["bus"].update(settings)
        return parse_inventory(yaml.safe_dump(data), tmp_path / "inv.yaml")
    assert inv(1).bus.sync_replicas == 0 and inv(3).bus.sync_replicas == 1
    assert inv(3, sync_replicas=2).bus.sync_replicas == 2 and inv(3, sync_replicas=0).bus.sync_replicas == 0
    for bus, value in ((3, 3), (1, 1), (3, -1)):
        with pytest.raises(InventoryError) as refused:
            inv(bus, sync_replicas=value)
        problem = refused.value.problems[0]
        assert problem.field == "bus.sync_replicas" and f"outside 0..{bus - 1}" in problem.message


def test_one_bus_node_is_a_single_point_of_failure_warning(tmp_path: Path) -> None:
    def warnings(bus: int) -> list[str]:
        return parse_inventory(yaml.safe_dump(generate(3, bus=bus)), tmp_path / "inv.yaml").warnings
    assert any("single point of failure" in w for w in warnings(1))
    assert not any("single point of failure" in w for w in warnings(3))
    assert any("stops writes" in w for w in warnings(2))      # sync_replicas 1 of 1 other bus node
    assert not any("stops writes" in w for w in warnings(3))
