"""Check rendered files with the cluster's own tools: corosync -t, haproxy -c, crm_verify, crm_simulate.

Each check returns a CheckResult (tool, target, ok, detail); callers decide what a failure means.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from congressctl import tls
from congressctl.errors import ToolFailedError, ToolMissingError, ToolTimeoutError
from congressctl.files import atomic_write
from congressctl.inventory import Inventory
from congressctl.pacemaker import Placement, node_list, parse_crm_mon, placement_problems
from congressctl.render import RenderedFile

TOOL_TIMEOUT_S = 60
CLEANUP_TIMEOUT_S = 10   # its own bound: a check that ran out of time must still remove its namespace
TOOLS = ("corosync", "haproxy", "crm_verify", "crm_simulate", "crm_mon", "ip", "unshare")
_netns_serial = count()


@dataclass(frozen=True)
class CheckResult:
    tool: str
    target: str
    ok: bool
    detail: str = ""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def require_tools() -> None:
    missing = missing_tools()
    if missing:
        raise ToolMissingError(f"validator tools not installed: {', '.join(missing)} (run `make install`, or "
                               "pass --no-tools to skip these checks)")
    if os.geteuid() != 0:
        raise ToolMissingError("checking corosync.conf needs root (a throwaway network namespace holds the "
                               "node's address); run as root or pass --no-tools")


def _run(argv: list[str], *, check: bool = False, timeout: float | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a tool; running out of time, or failing when `check`, is a named error naming the command."""
    timeout = TOOL_TIMEOUT_S if timeout is None else timeout
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check, env=env)
    except subprocess.TimeoutExpired:
        raise ToolTimeoutError(f"`{shlex.join(argv)}` did not finish within {timeout:g} s (killed)") from None
    except subprocess.CalledProcessError as exc:
        raise ToolFailedError(f"`{shlex.join(argv)}` failed (exit {exc.returncode}): {_tail(exc, 1)}") from None


def _tail(proc: subprocess.CompletedProcess | subprocess.CalledProcessError, lines: int = 6) -> str:
    text = (proc.stderr or "") + (proc.stdout or "")
    kept = [ln for ln in text.strip().splitlines() if "Partial" not in ln]
    return "\n".join(kept[-lines:])


def check_corosync(conf: bytes, address: str, node: str) -> CheckResult:
    """corosync -t also checks the local host is a member, so run it where the node's address lives:
    a throwaway network namespace with the address on lo, and a private mount namespace with a scratch
    authkey and log directory (corosync -t insists both exist)."""
    netns = f"cctl-check-{os.getpid()}-{next(_netns_serial)}"
    with tempfile.TemporaryDirectory(prefix="cctl-corosync-") as tmp:
        conf_path = Path(tmp) / "corosync.conf"
        conf_path.write_bytes(conf)
        script = ("mount -t tmpfs cctl /etc/corosync && head -c 256 /dev/urandom > /etc/corosync/authkey && "
                  "mount -t tmpfs cctl /var/log && mkdir -p /var/log/cluster && "
                  f"exec corosync -t -c {conf_path}")
        try:
            _run(["ip", "netns", "add", netns], check=True)
            _run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
            _run(["ip", "-n", netns, "addr", "add", f"{address}/32", "dev", "lo"], check=True)
            proc = _run(["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private",
                         "sh", "-c", script])
        finally:
            _run(["ip", "netns", "del", netns], timeout=CLEANUP_TIMEOUT_S)
    return CheckResult("corosync -t", f"{node}/corosync.conf", proc.returncode == 0,
                       "" if proc.returncode == 0 else f"exit {proc.returncode}: {_tail(proc)}")


def check_haproxy(cfg: bytes, node: str) -> CheckResult:
    """haproxy -c loads the certificate files the config names, which live on the hosts only: the check reads
    the config with its TLS folder pointed at throwaway certificates of the same names."""
    with tempfile.TemporaryDirectory(prefix="cctl-haproxy-") as tmp:
        path = Path(tmp) / "haproxy.cfg"
        path.write_bytes(cfg.replace(tls.TLS_DIR.encode(), f"{tmp}/tls".encode()))
        _test_certificates(Path(tmp) / "tls")
        proc = _run(["haproxy", "-c", "-f", str(path)])
    return CheckResult("haproxy -c", f"{node}/haproxy.cfg", proc.returncode == 0,
                       "" if proc.returncode == 0 else f"exit {proc.returncode}: {_tail(proc)}")


def _test_certificates(folder: Path) -> None:
    ca = tls.make_ca("check", days=1)
    api = tls.issue(ca, name="check", addresses=["127.0.0.1"], days=1)
    for target, data in ((tls.API_CA, ca.cert), (tls.API_PEM, api.cert + api.key), (tls.API_CERT, api.cert),
                         (tls.API_KEY, api.key)):
        atomic_write(folder / Path(target).name, data, 0o600)


def check_cib(cib: bytes, up: Sequence[str] = ()) -> CheckResult:
    """crm_verify on the CIB as a quorate cluster holds it, the `up` nodes online (crm_simulate -u): with an empty
    status every node is unclean, which with stonith-enabled is a warning (exit 78) on any CIB. A CIB that
    crm_simulate cannot read is verified as it is, so that crm_verify names what is wrong with it."""
    with tempfile.TemporaryDirectory(prefix="cctl-cib-") as tmp:
        path, online = Path(tmp) / "cib.xml", Path(tmp) / "online.xml"
        path.write_bytes(cib)
        if up:
            argv = ["crm_simulate", "-x", str(path), "-q", "true", "-O", str(online)]
            if _run([*argv, *(a for node in up for a in ("-u", node))]).returncode == 0 and online.exists():
                path = online
        proc = _run(["crm_verify", "--xml-file", str(path)])
    return CheckResult("crm_verify", "cib.xml", proc.returncode == 0,
                       "" if proc.returncode == 0 else f"exit {proc.returncode}: {_tail(proc)}")


def simulate(cib: bytes, up: Sequence[str], fail: Sequence[str] = ()) -> Placement:
    """Bring `up` nodes online in the rendered CIB, let the scheduler place everything, then fail `fail`."""
    with tempfile.TemporaryDirectory(prefix="cctl-sim-") as tmp:
        src, state = Path(tmp) / "cib.xml", Path(tmp) / "up.xml"
        src.write_bytes(cib)
        argv = ["crm_simulate", "-x", str(src), "-S", "-q", "true", "-O", str(state)]
        for node in up:
            argv += ["-u", node]
        _simulate_step(argv)
        if fail:
            failed = Path(tmp) / "failed.xml"
            argv = ["crm_simulate", "-x", str(state), "-S", "-q", "true", "-O", str(failed)]
            for node in fail:
                argv += ["-f", node]
            _simulate_step(argv)
            state = failed
        proc = _run(["crm_mon", "-1", "--output-as=xml"], env={**os.environ, "CIB_file": str(state)})
        if proc.returncode != 0:
            raise ToolMissingError(f"crm_mon could not read the simulated cluster: {_tail(proc)}")
        return parse_crm_mon(proc.stdout)


def _simulate_step(argv: list[str]) -> None:
    proc = _run(argv)
    if proc.returncode != 0:
        raise ToolMissingError(f"crm_simulate failed (exit {proc.returncode}): {_tail(proc)}")


def check_placements(inv: Inventory, cib: bytes) -> list[CheckResult]:
    """The failure drills crm_simulate answers: all up, DSD node fails, VIP node fails, promoted bus fails."""
    names = [n.name for n in inv.nodes]
    results = []
    up = simulate(cib, names)
    results.append(_expect_all_up(inv, up))
    dsd_node = up.on("dsd")[0] if up.on("dsd") else None
    if dsd_node and len(inv.dsd_preference) > 1:
        after = simulate(cib, names, [dsd_node])
        want = next(n for n in inv.dsd_preference if n != dsd_node)
        ok = after.on("dsd") == [want]
        results.append(CheckResult("crm_simulate", f"fail {dsd_node} (DSD node)", ok,
                                   f"DSD moves to {node_list(after.on('dsd'))} (expected {want})"))
    vip_node = up.on("vip")[0] if up.on("vip") else None
    if vip_node and len(names) > 1:
        after = simulate(cib, names, [vip_node])
        moved = after.on("vip") and after.on("vip") != [vip_node]
        ok = bool(moved) and after.on("vip") == after.on("haproxy")
        results.append(CheckResult("crm_simulate", f"fail {vip_node} (VIP node)", ok,
                                   f"VIP on {node_list(after.on('vip'))}, "
                                   f"HAProxy on {node_list(after.on('haproxy'))}"))
    bus_nodes = inv.with_role("bus")
    if len(bus_nodes) > 1 and up.promoted.get("bus"):
        promoted = up.promoted["bus"][0]
        after = simulate(cib, names, [promoted])
        new = after.promoted.get("bus", [])
        ok = len(new) == 1 and new[0] != promoted and after.on("bus-vip") == new
        results.append(CheckResult("crm_simulate", f"fail {promoted} (promoted bus)", ok,
                                   f"bus promoted on {node_list(new)}, "
                                   f"bus VIP on {node_list(after.on('bus-vip'))}"))
    return results


def _expect_all_up(inv: Inventory, up: Placement) -> CheckResult:
    problems = placement_problems(inv, up)
    if up.on("dsd") != [inv.dsd_preference[0]]:
        problems.append(f"DSD on {node_list(up.on('dsd'))}, expected {inv.dsd_preference[0]} (first preference)")
    detail = "; ".join(problems) or (f"DSD on {node_list(up.on('dsd'))}; "
                                     f"api-pe on {node_list(up.on('api-pe'))}; "
                                     f"VIP+HAProxy on {node_list(up.on('vip'))}")
    return CheckResult("crm_simulate", "all nodes up", not problems, detail)


def verify_all(inv: Inventory, rendered: dict[str, list[RenderedFile]], cib: bytes) -> list[CheckResult]:
    """Every rendered file through its own tool, then the placement drills."""
    require_tools()
    results = []
    for node in inv.nodes:
        files = {f.name: f.content for f in rendered[node.name]}
        results.append(check_corosync(files["corosync.conf"], node.address, node.name))
        results.append(check_haproxy(files["haproxy.cfg"], node.name))
    cib_result = check_cib(cib, [n.name for n in inv.nodes])
    results.append(cib_result)
    if cib_result.ok:
        results.extend(check_placements(inv, cib))
    return results
