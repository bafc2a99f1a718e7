"""Pacemaker on a live cluster: its tools run over an SSH connection, and the reading of their XML.

Two sections, after pcs's lib/pacemaker/live.py (running the tools) and state.py (reading what they print).
Placement is read from `crm_mon --output-as=xml`, never from its human output; the same reading serves the
simulated clusters of verify.py.
"""

from __future__ import annotations

import re
import shlex
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from congressctl import remote
from congressctl.inventory import Inventory

CRM_MON = "crm_mon -1 --output-as=xml"
BAN_LIFETIME = "PT10M"


@dataclass
class Placement:
    """Where each resource runs, which nodes are online and whether the cluster has quorum."""

    running: dict[str, list[str]] = field(default_factory=dict)
    promoted: dict[str, list[str]] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)     # resource instances not active (id per instance)
    failed: list[str] = field(default_factory=list)
    online: list[str] = field(default_factory=list)
    offline: list[str] = field(default_factory=list)
    quorum: bool = False

    def on(self, resource: str) -> list[str]:
        return self.running.get(resource, [])


@dataclass(frozen=True)
class OpTiming:
    """A recurring operation's interval and timeout, in seconds."""

    interval_s: float
    timeout_s: float


@dataclass
class HostView:
    """One host's own crm_mon: the cluster as that host sees it and its DC, or the error crm_mon reported."""

    placement: Placement | None = None
    dc: str | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------------- live tools


def crm_mon_xml(conn: remote.Connection, timeout: float = 20) -> str | None:
    """crm_mon's XML on the connected host, or None when it failed or printed nothing."""
    proc = conn.run(CRM_MON, timeout=timeout, check=False)
    if proc.exit_code != 0 or not proc.stdout.strip():
        return None
    return proc.stdout


def cluster_placement(conn: remote.Connection) -> Placement | None:
    xml_text = crm_mon_xml(conn)
    return parse_crm_mon(xml_text) if xml_text is not None else None


def query_resources(conn: remote.Connection) -> remote.CommandResult:
    """The CIB's resources section (exit code not checked: the CIB may not be up yet)."""
    return conn.run("cibadmin --query --scope resources", timeout=20, check=False)


def live_op_timing(conn: remote.Connection, op_id: str) -> OpTiming | None:
    """The interval and timeout of the operation `op_id` in the live CIB (None when it has no such op)."""
    out = query_resources(conn).stdout
    return op_timing(out, op_id) if out.strip() else None


def fencing_under_way(conn: remote.Connection, node: str) -> bool:
    """Whether the fencer (as the connected host knows it) is still carrying out an action against `node`."""
    out = conn.run(f"stonith_admin --history {shlex.quote(node)} --output-as=xml", timeout=20).stdout
    return fencing_pending(out, node)


def replace_configuration(conn: remote.Connection, cib: bytes) -> None:
    """Replace the live CIB's configuration section with the one of `cib`, leaving its status alone."""
    configuration = ET.fromstring(cib).find("configuration")
    assert configuration is not None   # templates/cib.xml.j2 always has one
    conn.run("cibadmin --replace --scope configuration --xml-pipe", timeout=60,
             input=ET.tostring(configuration, encoding="unicode"))


def patch_configuration(conn: remote.Connection, old: str, new: str) -> bool:
    """Apply to the live CIB what changed from the CIB file `old` to `new` (both on the host), touching nothing
    else: not what Pacemaker keeps there itself, nor bans. True once the live configuration holds `new`
    (`live_lacks` finds nothing); False when it could not (no `old`, a refused patch): then replace it."""
    diff = conn.run(f"test -f {shlex.quote(old)} && crm_diff --no-version -o {shlex.quote(old)} -n {shlex.quote(new)}",
                    timeout=30, check=False)
    if diff.exit_code not in (0, 1):
        return False
    if diff.exit_code == 1:
        patch = ET.fromstring(diff.stdout)
        # the digest is that of `new` itself; the live CIB also holds what Pacemaker added, so it never matches
        patch.attrib.pop("digest", None)
        applied = conn.run("cibadmin --patch --xml-pipe", timeout=60, input=ET.tostring(patch, encoding="unicode"),
                           check=False)
        if applied.exit_code != 0:
            return False
    compare = f'crm_diff --no-version -o "$t" -n {shlex.quote(new)}'
    live = conn.run(f't=$(mktemp) && cibadmin --query > "$t" && {compare}; rc=$?; rm -f "$t"; exit $rc', timeout=30,
                    check=False)
    if live.exit_code == 0:
        return True
    old_cib = conn.run(f"cat {shlex.quote(old)}", timeout=30).stdout
    return live.exit_code == 1 and not live_lacks(live.stdout, old_cib)


def ban(conn: remote.Connection, resource: str, node: str, lifetime: str = BAN_LIFETIME) -> None:
    """Keep `resource` off `node` (for a clone: stop its instance there) until `clear`, or until `lifetime`
    (ISO 8601) has passed, so that a deploy killed in between leaves nothing banned for long."""
    conn.run(f"crm_resource --resource {shlex.quote(resource)} --ban --node {shlex.quote(node)} "
             f"--lifetime {shlex.quote(lifetime)} --quiet", timeout=30)


def move_promoted(conn: remote.Connection, resource: str, node: str, lifetime: str = BAN_LIFETIME) -> None:
    """Have Pacemaker promote the promotable clone `resource` on `node` (demoting the promoted instance
    elsewhere first), until `clear` or `lifetime`, as `ban` does."""
    conn.run(f"crm_resource --resource {shlex.quote(resource)} --move --promoted --node {shlex.quote(node)} "
             f"--lifetime {shlex.quote(lifetime)} --quiet", timeout=30)


def clear(conn: remote.Connection, resource: str, node: str | None = None) -> None:
    """Remove the bans (and moves) crm_resource made for `resource`: on `node`, or everywhere."""
    where = f" --node {shlex.quote(node)}" if node else ""
    conn.run(f"crm_resource --resource {shlex.quote(resource)} --clear{where} --quiet", timeout=30)


def bans(conn: remote.Connection) -> list[tuple[str, str]]:
    """(resource, node) of every location constraint crm_resource --ban or --move left in the CIB."""
    out = conn.run("cibadmin --query --scope constraints", timeout=20, check=False).stdout
    return parse_bans(out) if out.strip() else []


def cleanup(conn: remote.Connection) -> None:
    """Forget every failure Pacemaker counted."""
    conn.run("crm_resource --cleanup --quiet >/dev/null 2>&1 || true", timeout=60)


# ---------------------------------------------------------------------------------------------- reading XML


def parse_crm_mon(xml_text: str) -> Placement:
    """Resource placement from `crm_mon --output-as=xml` (real or simulated)."""
    root = ET.fromstring(xml_text)
    placement = Placement()
    for node in root.iter("node"):
        if node.get("online") is not None and node.get("type") == "member":
            (placement.online if node.get("online") == "true" else placement.offline).append(node.get("name", ""))
    dc = root.find("summary/current_dc")
    placement.quorum = dc is not None and dc.get("with_quorum") == "true"
    resources = root.find("resources")
    for res in resources.iter("resource") if resources is not None else []:
        rid = res.get("id", "")
        if res.get("failed") == "true":
            placement.failed.append(rid)
        if res.get("active") != "true" or res.get("failed") == "true":
            placement.stopped.append(rid)
            continue
        nodes = [n.get("name", "") for n in res.findall("node")]
        placement.running.setdefault(rid, []).extend(nodes)
        if res.get("role") in ("Promoted", "Master"):
            placement.promoted.setdefault(rid, []).extend(nodes)
    for table in (placement.running, placement.promoted):
        for rid in table:
            table[rid] = sorted(table[rid])
    return placement


def parse_bans(xml_text: str) -> list[tuple[str, str]]:
    """(resource, node) of the cli-ban-*/cli-prefer-* location constraints in a CIB's constraints section (one
    made with a lifetime names its node in a rule)."""
    found = []
    for c in ET.fromstring(xml_text).iter("rsc_location"):
        if not c.get("id", "").startswith(("cli-ban-", "cli-prefer-")):
            continue
        named = [e.get("value", "") for e in c.iter("expression") if e.get("attribute") == "#uname"]
        found.append((c.get("rsc", ""), c.get("node") or (named[0] if named else "")))
    return found


def live_lacks(diff_xml: str, old_cib: str) -> list[str]:
    """What the live configuration lacks of ours, from `crm_diff` live -> our new CIB (format 2): anything it
    would create, change or move under /cib/configuration (but a comment), and anything it would delete that
    our previous CIB `old_cib` had (we dropped it; live kept it). Deleting the rest is fine: bans, what
    Pacemaker keeps itself. Empty when the live configuration holds ours."""
    root = ET.fromstring(diff_xml)
    if root.get("format") != "2":
        return ["crm_diff did not answer in format 2"]
    old = ET.fromstring(old_cib)
    lacking = []
    for change in root.findall("change"):
        path, operation = change.get("path", ""), change.get("operation")
        if not path.startswith("/cib/configuration"):
            continue
        if operation == "create" and not len(change):
            continue   # a comment (ElementTree drops them)
        if operation == "delete" and old.find("." + path[len("/cib"):]) is None:
            continue
        lacking.append(f"{operation} {path}")
    return lacking


def read_host_view(xml_text: str, exit_code: int) -> HostView | None:
    """A host's crm_mon output read; None when it is not XML at all (then only its stderr can tell why)."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError:
        return None
    if exit_code != 0 or root.find("summary") is None:
        return HostView(error=crm_mon_error(root) or f"crm_mon exited {exit_code}")
    return HostView(placement=parse_crm_mon(xml_text), dc=cluster_dc(root))


def cluster_dc(root: ET.Element) -> str | None:
    """The designated controller named in crm_mon's XML (None when there is none)."""
    dc = root.find("summary/current_dc")
    return dc.get("name") if dc is not None and dc.get("present") == "true" else None


def crm_mon_error(root: ET.Element) -> str | None:
    """The error crm_mon reports in its XML <status> (e.g. the cluster is not running on this host)."""
    status = root.find("status")
    if status is None:
        return None
    errors = [e.text.strip() for e in status.iter("error") if e.text and e.text.strip()]
    return "; ".join(errors) or status.get("message")


# Pacemaker's durations (crm_get_msec): a number with an optional unit, seconds when it has none
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|msec|s|sec|m|min|h|hr)?\s*$")
_UNIT_S = {"ms": 0.001, "msec": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}


def duration_s(text: str) -> float | None:
    """An op's interval or timeout as the CIB spells it ("2s", "500ms", "1min", "10"), in seconds; None when it
    is not one of those spellings (ISO 8601 is not read)."""
    match = _DURATION.match(text)
    if match is None:
        return None
    return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]


def op_timing(xml_text: str, op_id: str) -> OpTiming | None:
    """The interval and timeout of the <op id=op_id> of a CIB (or its resources section); None when it has no
    such op or spells either in a way duration_s does not read."""
    op = ET.fromstring(xml_text).find(f".//op[@id='{op_id}']")
    if op is None:
        return None
    # an op without a timeout has Pacemaker's default, 20 s
    interval, timeout = duration_s(op.get("interval", "0")), duration_s(op.get("timeout", "20s"))
    if interval is None or timeout is None:
        return None
    return OpTiming(interval_s=interval, timeout_s=timeout)


def failed_operations(xml_text: str) -> list[tuple[str | None, str]]:
    """(node, op_key) of every failed operation crm_mon's XML records (its <failure> elements)."""
    return [(f.get("node"), f.get("op_key") or "") for f in ET.fromstring(xml_text).iter("failure")]


def fencing_pending(xml_text: str, node: str) -> bool:
    """Whether `stonith_admin --history`'s XML has an action against `node` still under way."""
    return any(e.get("target") == node and e.get("status") == "pending"
               for e in ET.fromstring(xml_text).iter("fence_event"))


def node_list(nodes: list[str]) -> str:
    return ", ".join(nodes) or "nowhere"


def placement_problems(inv: Inventory, placement: Placement) -> list[str]:
    """What differs from a healthy cluster: every resource where the design puts it. Empty when healthy."""
    problems = []
    if placement.offline:
        problems.append(f"nodes offline: {node_list(placement.offline)}")
    if placement.failed:
        problems.append(f"failed resources: {node_list(sorted(set(placement.failed)))}")
    if len(placement.on("dsd")) != 1 or placement.on("dsd")[0] not in inv.dsd_preference:
        problems.append(f"DSD on {node_list(placement.on('dsd'))}, expected exactly one of "
                        f"{node_list(inv.dsd_preference)}")
    api_nodes = sorted(n.name for n in inv.with_role("api-pe"))
    if placement.on("api-pe") != api_nodes:
        problems.append(f"api-pe on {node_list(placement.on('api-pe'))}, expected {node_list(api_nodes)}")
    if len(placement.on("vip")) != 1 or placement.on("vip") != placement.on("haproxy"):
        problems.append(f"VIP on {node_list(placement.on('vip'))} and HAProxy on "
                        f"{node_list(placement.on('haproxy'))}: expected one node, together")
    bus_nodes = sorted(n.name for n in inv.with_role("bus"))
    if len(bus_nodes) == 1 and placement.on("bus") != bus_nodes:
        problems.append(f"bus on {node_list(placement.on('bus'))}, expected {bus_nodes[0]}")
    promoted = placement.promoted.get("bus", [])
    if len(bus_nodes) > 1 and (len(promoted) != 1 or placement.on("bus-vip") != promoted):
        problems.append(f"bus promoted on {node_list(promoted)}, bus VIP on {node_list(placement.on('bus-vip'))}")
    return problems
