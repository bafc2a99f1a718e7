"""congressctl deploy against the shared lab: real sshd, corosync, pacemaker, redis, haproxy, congress nodes."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from congressctl import deploy
from congressctl import lab as labmod
from congressctl import pacemaker
from congressctl.inventory import load_inventory
from congressctl.render import render_all
from fixtures_cluster import CLI, congressctl, retimed_inventory

pytestmark = pytest.mark.lab


def _exec(cluster, host: str, *argv: str) -> str:
    proc = labmod.lab_exec(cluster.lab, host, list(argv), timeout=60)
    out = proc.stdout.decode() if isinstance(proc.stdout, bytes) else proc.stdout
    assert proc.returncode == 0, f"{argv} on {host}: {proc.stderr}"
    return out


def _placement(cluster) -> pacemaker.Placement:
    return pacemaker.parse_crm_mon(_exec(cluster, "n1", "crm_mon", "-1", "--output-as=xml"))


def _start_times(cluster) -> dict[str, str]:
    """Process start times of the cluster stack and congress nodes on every host."""
    times = {}
    for host in cluster.inv.nodes:
        out = _exec(cluster, host.name, "ps", "-eo", "pid,stat,lstart,args", "--no-headers")
        for line in out.splitlines():
            pid, stat, rest = line.split(None, 2)
            # Redis forks a child for each background save or AOF rewrite: an exited one waits as a zombie
            if stat.startswith("Z"):
                continue
            if any(p in rest for p in ("corosync", "pacemakerd", "congressctl serve", "redis-server", "haproxy")):
                times[f"{host.name}:{pid}"] = rest
    return times


def test_first_deploy_starts_everything_in_place(cluster) -> None:
    assert cluster.first_deploy["ok"] and cluster.first_deploy["cib_loaded"]
    placement = _placement(cluster)
    assert pacemaker.placement_problems(cluster.inv, placement) == []
    assert len(placement.on("dsd")) == 1 and placement.on("dsd")[0] in cluster.inv.dsd_preference
    assert placement.on("api-pe") == sorted(n.name for n in cluster.inv.with_role("api-pe"))
    assert placement.quorum and sorted(placement.online) == sorted(n.name for n in cluster.inv.nodes)


def test_corosync_scheduling_follows_the_inventory(cluster) -> None:
    """corosync.sched_rr reaches the hosts: realtime round-robin when true, the normal scheduler when false."""
    policy = "SCHED_RR" if cluster.inv.corosync.sched_rr else "SCHED_OTHER"
    for host in cluster.inv.nodes:
        pid = _exec(cluster, host.name, "pgrep", "-x", "corosync").split()[0]
        assert policy in _exec(cluster, host.name, "chrt", "-p", pid), host.name


def test_api_answers_through_the_vip_and_policies_reach_every_node(cluster) -> None:
    vip = cluster.inv.api_url()
    assert httpx.get(f"{vip}/v1", timeout=5, headers=cluster.headers, verify=cluster.verify).status_code == 200
    created = httpx.post(f"{vip}/v1/policies", json={"name": "deploytest", "description": "from the test"},
                         timeout=5, headers=cluster.headers, verify=cluster.verify)
    assert created.status_code == 201, created.text
    for node in cluster.inv.with_role("api-pe"):
        deadline = time.monotonic() + 5
        while True:
            names = [p["name"] for p in httpx.get(f"{cluster.inv.api_url(node.address)}/v1/policies",
                                                  timeout=5, headers=cluster.headers,
                                                  verify=cluster.verify).json()["results"]]
            if "deploytest" in names or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert "deploytest" in names, f"policy not visible on {node.name}"


def test_second_deploy_changes_nothing_and_restarts_nothing(cluster) -> None:
    before = _start_times(cluster)
    proc = congressctl("deploy", "-i", str(cluster.inventory_path), "--output", "json", check=True)
    result = json.loads(proc.stdout)
    assert result["ok"] and not result["changed"] and not result["cib_loaded"]
    assert all(not h["changed"] and not h["restarted"] and not h["installed"] for h in result["hosts"].values())
    assert "no change" in proc.stderr
    assert _start_times(cluster) == before


def _changed_inventory(cluster, tmp_path: Path) -> Path:
    return retimed_inventory(cluster, tmp_path, full_sync_interval_s=31)


def test_dry_run_shows_the_diff_and_touches_nothing(cluster, tmp_path: Path) -> None:
    before = _exec(cluster, "n2", "cat", "/etc/congressctl/congress.yaml")
    proc = congressctl("deploy", "-i", str(_changed_inventory(cluster, tmp_path)), "--dry-run", check=True)
    assert "-timings: {heartbeat_interval_ms: 200, peer_timeout_ms: 1000, full_sync_interval_s: 30}" in proc.stdout
    assert "full_sync_interval_s: 31}" in proc.stdout
    assert "/etc/congressctl/congress.yaml" in proc.stdout
    assert _exec(cluster, "n2", "cat", "/etc/congressctl/congress.yaml") == before


def test_unknown_host_key_is_refused(cluster, tmp_path: Path) -> None:
    data = yaml.safe_load(cluster.inventory_path.read_text())
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    data["ssh"]["known_hosts"] = str(empty)
    data["ssh"]["key"] = str((cluster.inventory_path.parent / data["ssh"]["key"]).resolve())
    data["state_dir"] = str((cluster.inventory_path.parent / data.get("state_dir", ".congressctl-state")).resolve())
    path = tmp_path / "inv.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = congressctl("deploy", "-i", str(path), "--output", "json")
    assert proc.returncode != 0
    result = json.loads(proc.stdout)
    assert all(not h["ok"] and h["step"] == "connect" for h in result["hosts"].values())
    assert all("known" in h["error"].lower() or "host key" in h["error"].lower() for h in result["hosts"].values())
    assert empty.read_text() == ""


def test_unreachable_host_fails_rolls_back_and_next_deploy_converges(cluster, tmp_path: Path) -> None:
    changed = _changed_inventory(cluster, tmp_path)
    before = {n.name: _exec(cluster, n.name, "cat", "/etc/congressctl/congress.yaml") for n in cluster.inv.nodes}
    # SSH alone cut off (not its link): a host whose link is down is fenced, and back within seconds
    _exec(cluster, "n3", "sh", "-c", "nft add table inet nossh && nft add chain inet nossh in "
          "'{ type filter hook input priority 0; policy accept; }' && nft add rule inet nossh in tcp dport 22 drop")
    try:
        proc = congressctl("deploy", "-i", str(changed), "--output", "json", timeout=300)
    finally:
        _exec(cluster, "n3", "nft", "delete", "table", "inet", "nossh")
    assert proc.returncode != 0
    result = json.loads(proc.stdout)
    assert not result["hosts"]["n3"]["ok"] and result["hosts"]["n3"]["step"] == "connect"
    for name in ("n1", "n2"):
        assert result["hosts"][name]["ok"]
        assert "/etc/congressctl/congress.yaml" in result["hosts"][name]["rolled_back"]
        assert _exec(cluster, name, "cat", "/etc/congressctl/congress.yaml") == before[name]
    time.sleep(1)
    again = congressctl("deploy", "-i", str(changed), "--output", "json", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for node in cluster.inv.nodes:
        assert "full_sync_interval_s: 31" in _exec(cluster, node.name, "cat", "/etc/congressctl/congress.yaml")
    back = congressctl("deploy", "-i", str(cluster.inventory_path), "--output", "json", timeout=600)
    assert back.returncode == 0, back.stderr[-3000:]
    assert pacemaker.placement_problems(cluster.inv, _placement(cluster)) == []


# Runs inside a host. Once the deploy's SSH session shows up (a new child of the host's sshd), it waits for the
# temporary file of the atomic push of {path} and stops that session's process group (sshd serves SFTP in it,
# internal-sftp) while the file is written but not yet renamed. It answers "held FILE" when the file is still
# there half a second later (the push is in flight, and stays so until SIGCONT), "missed FILE" when it was
# renamed meanwhile. The held process groups are left in {state}.held for _release.
HOLD_PUSH = r"""
echo $$ > {state}.pid
l=$(cat /run/sshd.pid) || exit 1
old=" $(pgrep -P "$l" | tr '\n' ' ') "
echo ready
s=""
while [ -z "$s" ]; do
  for p in $(pgrep -P "$l"); do
    case "$old" in *" $p "*) ;; *) s="$s $p" ;; esac
  done
  [ -n "$s" ] || sleep 0.01
done
echo "$s" > {state}.held
while :; do
  for f in {path}.tmp-*; do
    if [ -e "$f" ]; then
      for p in $s; do kill -s STOP -- "-$p"; done
      sleep 0.5
      if [ -e "$f" ]; then echo "held $f"; else echo "missed $f"; fi
      exit 0
    fi
  done
done
"""
HOLD_STATE = "/run/congressctl-test-hold"


def _hold_push(cluster, host: str, path: str) -> subprocess.Popen:
    """Start HOLD_PUSH on `host`; returns once it knows the SSH sessions that were there before the deploy."""
    script = HOLD_PUSH.format(path=path, state=HOLD_STATE)
    watcher = subprocess.Popen(labmod.lab_exec_argv(cluster.lab, host, ["timeout", "300", "sh", "-c", script]),
                               stdout=subprocess.PIPE, text=True, env=labmod.HOST_ENV)
    assert _line(watcher, 30) == "ready"
    return watcher


def _line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


def _release(cluster, host: str, watcher: subprocess.Popen) -> None:
    """Let the held session go on and stop the watcher, whatever state the test left them in."""
    _exec(cluster, host, "sh", "-c", f"for p in $(cat {HOLD_STATE}.held 2>/dev/null); do kill -s CONT -- -$p; done; "
          f"kill $(cat {HOLD_STATE}.pid 2>/dev/null) 2>/dev/null; rm -f {HOLD_STATE}.held {HOLD_STATE}.pid; true")
    watcher.wait(timeout=30)


def _rendered(inventory_path: Path, path: str) -> dict[str, str]:
    """What deploy pushes to `path` on each host for this inventory."""
    inv = load_inventory(inventory_path)
    rendered = render_all(inv, deploy.load_or_create_secrets(inv, create=False))
    return {name: next(f.content for f in files if f.path == path).decode() for name, files in rendered.items()}


def test_ctrl_c_mid_deploy_leaves_every_file_whole_and_the_next_deploy_converges(cluster, tmp_path: Path) -> None:
    """Ctrl-C while n1's push of congress.yaml is known to be in flight (its temporary file written, not yet
    renamed: the push is held there): every host keeps the old file or has the new one whole."""
    changed = _changed_inventory(cluster, tmp_path)
    path = "/etc/congressctl/congress.yaml"
    before = {n.name: _exec(cluster, n.name, "cat", path) for n in cluster.inv.nodes}
    after = _rendered(changed, path)
    watcher = _hold_push(cluster, "n1", path)
    proc = subprocess.Popen([*CLI, "deploy", "-i", str(changed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        held = _line(watcher, 120)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)   # the interrupt is handled while n1's push is still half-way
    finally:
        _release(cluster, "n1", watcher)
        _, err = proc.communicate(timeout=300)
    assert held.startswith("held "), f"no push of {path} caught in flight on n1 ({held!r}):\n{err[-3000:]}"
    assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, err[-3000:])
    assert proc.returncode != 0
    for node in cluster.inv.nodes:
        now = _exec(cluster, node.name, "cat", path)
        assert now == before[node.name] or "full_sync_interval_s: 31" in now, f"{node.name}: {now!r}"
        assert now in (before[node.name], after[node.name]), f"{node.name}: neither the old nor the new file: {now!r}"
        assert yaml.safe_load(now)["node_id"] == node.name
        leftovers = _exec(cluster, node.name, "find", "/etc/congressctl", "/etc/corosync", "/etc/haproxy",
                          "/usr/lib/ocf/resource.d/congressctl", "-name", "*.tmp-*")
        assert leftovers.strip() == "", f"{node.name}: temporary files left: {leftovers}"
    back = congressctl("deploy", "-i", str(cluster.inventory_path), "--output", "json", timeout=600)
    assert back.returncode == 0, back.stderr[-3000:]
    for node in cluster.inv.nodes:
        assert _exec(cluster, node.name, "cat", path) == before[node.name]
    assert pacemaker.placement_problems(cluster.inv, _placement(cluster)) == []
