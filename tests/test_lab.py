"""congressctl lab: real hosts on this machine (netns + private mounts + own sshd), checked from outside and in.

Most tests share the session's 3-host lab (fixture `lab`) and leave it as they found it; teardown, crash
recovery and the Corosync/Pacemaker check use small labs of their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import paramiko
import pytest
import yaml

from congressctl import lab as labmod
from congressctl import powerswitch
from congressctl.errors import LabError, PowerSwitchError
from congressctl.inventory import load_inventory
from congressctl.lab import Lab, check_capabilities, corosync_realtime, lab_down, lab_exec, lab_load, lab_status, lab_up
from fixtures_lab import require_lab, session_lab_name

pytestmark = pytest.mark.lab

PRIVATE_DIRS = [
    "/etc/corosync", "/var/lib/corosync", "/var/lib/pacemaker", "/var/log/cluster", "/var/log/pacemaker", "/run",
    "/dev/shm", "/etc/haproxy", "/etc/congressctl", "/var/lib/congressctl", "/var/log/congressctl",
    "/opt/congressctl", "/usr/lib/ocf/resource.d/congressctl", "/var/lib/redis", "/etc/redis", "/var/log/redis",
    "/var/log/haproxy", "/tmp", "/root",
]


def ssh(lab: Lab, address: str, command: str, known_hosts: Path | None = None) -> subprocess.CompletedProcess:
    """OpenSSH from the machine, strict host key checking, nothing from ~/.ssh or the system files."""
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-i", str(lab.key), "-o", "IdentitiesOnly=yes",
         "-o", f"UserKnownHostsFile={known_hosts or lab.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
         f"root@{address}", command],
        capture_output=True, text=True, timeout=60)


def sh(lab: Lab, host: str, script: str, input: bytes | None = None) -> str:
    done = lab_exec(lab, host, ["sh", "-c", script], input=input)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def processes_matching(needle: str) -> list[int]:
    """Pids on the whole machine whose command line contains needle (zombies have none)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmdline:
                found.append(int(entry))
    return found


def running(pid: int) -> bool:
    """True while pid exists and is not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def mount_namespaces_using(path: Path) -> list[int]:
    """Pids of processes in any mount namespace that has a mount naming path (e.g. an overlay's upperdir)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if str(path) in Path(f"/proc/{entry}/mountinfo").read_text():
                    found.append(int(entry))
            except OSError:
                continue
    return found


def processes_in_netns(netns: str) -> dict[int, str]:
    ino = os.stat(f"/run/netns/{netns}").st_ino
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == ino:
                    found[int(entry)] = Path(f"/proc/{entry}/comm").read_text().strip()
            except OSError:
                continue
    return found


# ---------------------------------------------------------------------------------------------- shared lab

def test_every_host_answers_openssh_with_strict_host_key_checking(lab: Lab) -> None:
    for h in lab.hosts:
        done = ssh(lab, h.address, "hostname")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == h.name


def test_paramiko_with_reject_policy_reaches_every_host(lab: Lab) -> None:
    for h in lab.hosts:
        client = paramiko.SSHClient()
        client.load_host_keys(str(lab.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(h.address, username="root", key_filename=str(lab.key), look_for_keys=False,
                           allow_agent=False, timeout=10, banner_timeout=10, auth_timeout=10)
            _, stdout, _ = client.exec_command("hostname", timeout=10)
            assert stdout.read().decode().strip() == h.name
        finally:
            client.close()


def test_a_host_key_that_does_not_match_is_refused(lab: Lab, tmp_path: Path) -> None:
    n1, n2 = lab.hosts[0], lab.hosts[1]
    n2_key = next(line.split(" ", 1)[1] for line in lab.known_hosts.read_text().splitlines()
                  if line.startswith(f"{n2.address} "))
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{n1.address} {n2_key}\n")
    done = ssh(lab, n1.address, "hostname", known_hosts=wrong)
    assert done.returncode == 255
    assert "HOST IDENTIFICATION HAS CHANGED" in done.stderr


def test_inventory_describes_the_lab(lab: Lab) -> None:
    inv = yaml.safe_load(lab.inventory.read_text())
    assert inv["cluster"] == lab.name
    assert [(n["name"], n["address"]) for n in inv["nodes"]] == [(h.name, h.address) for h in lab.hosts]
    assert [n["roles"] for n in inv["nodes"]] == [["api-pe", "dsd", "bus"]] * 3     # the replicated bus
    assert inv["bus"]["vip"].rsplit(".", 1)[0] == inv["vip"]["address"].rsplit(".", 1)[0]
    assert inv["vip"] == {"address": lab.vip, "cidr": 24, "interface": "eth0"}
    assert inv["dsd"]["preference"] == ["n2", "n3", "n1"]   # not the bus host first
    assert (lab.inventory.parent / inv["ssh"]["key"]).samefile(lab.key)
    assert (lab.inventory.parent / inv["ssh"]["known_hosts"]).samefile(lab.known_hosts)
    assert lab.vip.rsplit(".", 1)[0] == lab.hosts[0].address.rsplit(".", 1)[0]
    assert inv["corosync"]["sched_rr"] is corosync_realtime(len(lab.hosts))


def test_lab_corosyncs_give_up_realtime_priority_when_they_would_crowd_the_cores() -> None:
    assert corosync_realtime(3, 2) and corosync_realtime(4, 2)
    assert not corosync_realtime(12, 2) and not corosync_realtime(5, 2)


def test_inventory_passes_the_inventory_validator(lab: Lab) -> None:
    inv = load_inventory(lab.inventory)
    assert [n.name for n in inv.nodes] == [h.name for h in lab.hosts]


def test_a_host_has_only_its_own_network(lab: Lab) -> None:
    for h in lab.hosts:
        links = {line.split(":")[1].strip().split("@")[0] for line in sh(lab, h.name, "ip -o link").splitlines()}
        assert links == {"lo", "eth0"}
        assert f"inet {h.address}/24" in sh(lab, h.name, "ip -4 -o addr show dev eth0")
        assert sh(lab, h.name, "uname -n").strip() == h.name


def test_private_dirs_are_private_and_seeded_from_the_machine(lab: Lab) -> None:
    probe = f"probe-{uuid.uuid4().hex}"
    dirs = " ".join(PRIVATE_DIRS)
    created = sh(lab, "n1", f"for d in {dirs}; do test -d $d || echo $d; mkdir -p $d && echo x > $d/{probe}; done")
    try:
        assert sh(lab, "n1", f"for d in {dirs}; do test -e $d/{probe} && echo $d; done").split() == PRIVATE_DIRS
        assert sh(lab, "n2", f"for d in {dirs}; do test -e $d/{probe} && echo $d; true; done").split() == []
        assert [d for d in PRIVATE_DIRS if Path(d, probe).exists()] == []
    finally:
        sh(lab, "n1", f"for d in {dirs}; do rm -f $d/{probe}; done; rmdir {created} 2>/dev/null; true")
    # Files deploy never rewrites (the shared lab may already carry a deployed corosync.conf/haproxy.cfg).
    for packaged in ("/etc/default/corosync", "/etc/haproxy/errors/503.http"):
        assert lab_exec(lab, "n2", ["cat", packaged]).stdout == Path(packaged).read_bytes()


def test_a_host_sees_and_signals_only_its_own_processes(lab: Lab) -> None:
    marker = "4242.5"
    sh(lab, "n2", f"setsid sleep {marker} </dev/null >/dev/null 2>&1 &")
    try:
        assert f"sleep {marker}" not in sh(lab, "n1", "ps -eo args")
        assert f"sleep {marker}" in sh(lab, "n2", "ps -eo args")
        assert lab_exec(lab, "n1", ["pkill", "-f", f"sleep {marker}"]).returncode == 1   # nothing to kill there
        assert f"sleep {marker}" in sh(lab, "n2", "ps -eo args")
        assert "setup.sh" in sh(lab, "n1", "ps -o args= -p 1")
    finally:
        lab_exec(lab, "n2", ["pkill", "-f", f"sleep {marker}"])


def test_lab_exec_returns_exit_code_output_and_feeds_input(lab: Lab) -> None:
    assert lab_exec(lab, "n3", ["sh", "-c", "echo out; echo err >&2; exit 3"]).returncode == 3
    done = lab_exec(lab, "n3", ["sh", "-c", "echo $HOME; cat"], input=b"fed")
    assert done.stdout == b"/root\nfed"
    with pytest.raises(LabError) as failed:
        lab_exec(lab, "n3", ["sleep", "30"], timeout=0.5)
    assert failed.value.host == "n3"
    assert "sleep 30" not in sh(lab, "n3", "ps -eo args")
    with pytest.raises(LabError):
        lab_exec(lab, "n9", ["true"])


def test_status_reports_every_host_alive_and_reachable(lab: Lab) -> None:
    rows = lab_status(lab.name, lab.dir)
    assert [(r["name"], r["address"], r["pid"]) for r in rows] == [(h.name, h.address, h.pid) for h in lab.hosts]
    for row in rows:
        assert row["alive"] and row["reachable"], row
        assert Path(f"/proc/{row['sshd_pid']}/comm").read_text().strip() == "sshd"


def test_lab_load_finds_the_lab_by_dir_and_by_name(lab: Lab) -> None:
    assert lab_load(lab.name, lab.dir) == lab
    assert lab_load(lab.name) == lab
    with pytest.raises(LabError):
        lab_load("nosuchlab")


# ---------------------------------------------------------------------------------------------- own labs

def test_bad_requests_are_refused_before_anything_is_made(tmp_path: Path) -> None:
    require_lab()
    for kwargs in ({"nodes": 1}, {"nodes": 13}, {"name": "Bad_Name"}, {"name": "much-too-long-name"},
                   {"dir": Path("/etc/congressctl-lab")}):
        with pytest.raises(LabError) as refused:
            lab_up(**{"name": session_lab_name("r"), "dir": tmp_path / "r", **kwargs})
        assert refused.value.exit_code == 2
    assert not (tmp_path / "r").exists()
    assert not Path("/etc/congressctl-lab").exists()


def test_non_root_is_refused_with_exit_code_2() -> None:
    require_lab()
    os.seteuid(65534)
    try:
        with pytest.raises(LabError) as refused:
            check_capabilities()
    finally:
        os.seteuid(0)
    assert refused.value.exit_code == 2
    assert "needs root" in str(refused.value)


def _appeared(needle: str, timeout_s: float = 10.0) -> list[int]:
    """The pids matching needle once there are any: the shell that starts a process in the background returns
    before it has exec'd."""
    deadline = time.monotonic() + timeout_s
    while not (found := processes_matching(needle)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def test_down_stops_everything_and_leaves_nothing_behind(tmp_path: Path) -> None:
    require_lab()
    name = session_lab_name("d")
    lab = lab_up(2, name, tmp_path / "lab")
    marker = "4343.5"
    sh(lab, "n1", f"setsid sh -c \"trap '' TERM; exec sleep {marker}\" </dev/null >/dev/null 2>&1 &")
    stubborn = _appeared(f"sleep {marker}")
    try:
        assert len(stubborn) == 1
        pids = [h.pid for h in lab.hosts] + [r["sshd_pid"] for r in lab_status(name, lab.dir)] + stubborn
        assert mount_namespaces_using(lab.dir)
    except AssertionError:
        lab_down(name, lab.dir)     # no lab left behind for the rest of the suite
        raise

    removed = lab_down(name, lab.dir)

    assert f"process {stubborn[0]} (sleep)" in removed
    assert [p for p in pids if running(p)] == []
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(f"{name}-")]
    assert not Path(f"/sys/class/net/{lab.bridge}").exists()
    assert not [link for link in os.listdir("/sys/class/net") if link.startswith(f"{name}-")]
    assert str(lab.dir) not in Path("/proc/self/mountinfo").read_text()
    assert mount_namespaces_using(lab.dir) == []
    assert not Path(f"/run/congressctl-lab/{name}.json").exists()
    assert not lab.dir.exists()
    assert lab_down(name, lab.dir) == []


def test_up_over_a_crashed_lab_cleans_it_first(tmp_path: Path) -> None:
    require_lab()
    name = session_lab_name("c")
    crashed = lab_up(2, name, tmp_path / "first")
    for h in crashed.hosts:
        os.kill(h.pid, signal.SIGKILL)
    assert all(Path(f"/run/netns/{h.netns}").exists() for h in crashed.hosts)
    assert Path(f"/sys/class/net/{crashed.bridge}").exists()
    assert [(r["alive"], r["reachable"]) for r in lab_status(name, crashed.dir)] == [(False, False)] * 2

    again = lab_up(2, name, tmp_path / "second")
    try:
        assert not crashed.dir.exists()
        assert again.subnet == crashed.subnet
        for h in again.hosts:
            done = ssh(again, h.address, "hostname")
            assert done.stdout.strip() == h.name, done.stderr
    finally:
        lab_down(name, again.dir)
    assert not again.dir.exists()


COROSYNC_CONF = """totem {{
  version: 2
  cluster_name: {name}
  transport: knet
  crypto_cipher: none
  crypto_hash: none
  token: 1000
}}
nodelist {{
{nodes}}}
quorum {{
  provider: corosync_votequorum
}}
logging {{
  to_logfile: yes
  logfile: /var/log/cluster/corosync.log
  to_syslog: no
  to_stderr: no
}}
"""


@pytest.mark.slow
def test_corosync_and_pacemaker_form_a_quorate_cluster_and_down_stops_them(tmp_path: Path) -> None:
    """The real use: a 3-node Corosync/Pacemaker cluster inside lab hosts; teardown copes with pacemakerd."""
    require_lab()
    name = session_lab_name("p")
    lab = lab_up(3, name, tmp_path / "lab")
    try:
        nodes = "".join(f"  node {{\n    ring0_addr: {h.address}\n    name: {h.name}\n    nodeid: {i}\n  }}\n"
                        for i, h in enumerate(lab.hosts, 1))
        conf = COROSYNC_CONF.format(name=name, nodes=nodes).encode()
        for h in lab.hosts:
            sh(lab, h.name, "mkdir -p /var/log/cluster && cat > /etc/corosync/corosync.conf && corosync && "
                            "(setsid pacemakerd </dev/null >/dev/null 2>&1 &)", input=conf)
        deadline = time.monotonic() + 120
        while True:
            mon = lab_exec(lab, "n1", ["crm_mon", "-1", "--output-as=xml"]).stdout.decode()
            if mon.count('online="true"') == 3 and 'with_quorum="true"' in mon:
                break
            assert time.monotonic() < deadline, f"no quorate 3-node cluster:\n{mon}"
            time.sleep(1)
        cluster = {pid: comm for h in lab.hosts for pid, comm in processes_in_netns(h.netns).items()
                   if comm.startswith(("corosync", "pacemaker"))}
        assert {"corosync", "pacemakerd", "pacemaker-based"} <= set(cluster.values())
        assert Path("/etc/corosync/corosync.conf").read_bytes() != conf
    finally:
        lab_down(name, lab.dir)
    assert [pid for pid in cluster if running(pid)] == []


def test_the_power_switch_cycles_a_host_keeping_its_disk_and_down_stops_it(tmp_path: Path) -> None:
    require_lab()
    name = session_lab_name("w")
    lab = lab_up(2, name, tmp_path / "lab")
    try:
        switch = labmod.switch_status(name, lab.dir)
        assert switch["running"] and switch["address"] == f"{lab.gateway}:{powerswitch.PORT}"
        sh(lab, "n2", "echo kept > /etc/kept && echo kept > /var/lib/redis/kept && touch /tmp/gone && "
                      f"ip addr add {lab.vip}/24 dev eth0")
        before = lab.host("n2").pid

        assert labmod.power(lab, "reboot", "n2").status == "on"

        assert sh(lab, "n2", "cat /etc/kept /var/lib/redis/kept; ls /tmp") == "kept\nkept\n"   # lab_exec follows
        assert lab.host("n2").pid != before and lab_load(name, lab.dir).host("n2").pid == lab.host("n2").pid
        assert lab.vip not in sh(lab, "n2", "ip -o addr show dev eth0")
        assert labmod.power(lab, "off", "n2").status == "off"
        assert [r["alive"] for r in lab_status(name, lab.dir)] == [True, False]
        assert labmod.power(lab, "status", "n2").status == "off"
        with pytest.raises(PowerSwitchError, match="bad MAC"):
            powerswitch.send(address=lab.gateway, key=b"guess", action="on", plug="n2")
        assert labmod.power(lab, "on", "n2").status == "on"
        assert ssh(lab, lab.host("n2").address, "hostname").stdout.strip() == "n2"
    finally:
        lab_down(name, lab.dir)
    assert not running(switch["pid"])
    assert str(lab.dir) not in Path("/proc/self/mountinfo").read_text()
