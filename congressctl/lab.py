"""The lab: N real hosts on one Linux machine, for trying congressctl and for its integration tests.

Each host is a named network namespace on a bridge (own address on eth0) plus its own mount, UTS, IPC and PID
namespaces, held by a PID-1 script (templates/lab-host-setup.sh.j2). Inside a host /etc, /var, /usr and /opt are
overlays (copy-on-write private copies of the machine's directories, so packaged defaults exist but writes stay
in the host), /run, /dev/shm and /tmp are fresh tmpfs and /root is a private directory. Each host runs its own
sshd with its own host key; sessions it spawns inherit the host's namespaces, so a deploy over SSH lands "on"
the host exactly as on a real machine.

Killing a host's PID 1 makes the kernel kill every process of that host. Teardown relies on it because
pacemakerd ignores SIGTERM once corosync is gone: SIGTERM first, a grace period, then SIGKILL to PID 1.

Power: the lab's power switch (powerswitch.py, started by lab up, stopped by lab down) powers a host off (SIGKILL
to its PID 1, as a power loss) and on (its PID 1 started again, its network as at boot, its cluster stack
BOOT_DELAY_S later); Pacemaker reaches it through the fence agent templates/fence/fence_congresslab and the
shared key each host has at HOST_SWITCH_KEY. What a host wrote to its disk (the overlays' upper dirs) survives;
/run and /tmp are fresh. Its Redis data dir is a small tmpfs mounted on the machine (REDIS_DISK_MB, so that a
disk-full fault can fill it), which survives the host's power cycles too.

State: <dir>/lab.json, plus a machine-wide copy in /run/congressctl-lab/<name>.json so that the leftovers of a
crashed run are found even without <dir>. Netns, veth and bridge names derive from the lab name alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from congressctl import powerswitch
from congressctl.errors import LabError
from congressctl.files import atomic_write
from congressctl.inventory import FIRST_HOST_OCTET, generate
from congressctl.render import CLUSTER_SCRIPT, render_template

REGISTRY_DIR = Path("/run/congressctl-lab")
NETNS_DIR = Path("/run/netns")
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,10}$")   # "clb-<name>" must fit Linux's 15-character interface names
MIN_NODES, MAX_NODES = 2, 12
VIP_OCTET = 100
SSH_PORT = 22
OVERLAID = ("/etc", "/var", "/usr", "/opt")
# A lab dir inside these would be hidden by (or overlap) a host's private copies.
FORBIDDEN_DIR_ROOTS = OVERLAID + ("/run", "/proc", "/sys", "/dev")
SKIPPED_RUN_DIRS = {"netns", "congressctl-lab", "user"}
HOST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root", "USER": "root", "LOGNAME": "root", "SHELL": "/bin/bash", "LANG": "C.UTF-8",
}
TOOLS = ("ip", "unshare", "nsenter", "setsid", "mount", "ssh-keygen")
SSHD = Path("/usr/sbin/sshd")
GRACE_S = 5.0
KILL_WAIT_S = 15.0
READY_TIMEOUT_S = 60.0
CMD_TIMEOUT_S = 30.0
LOCK_TIMEOUT_S = 300.0
SWITCH_KEY, SWITCH_PID, SWITCH_LOG = "powerswitch.key", "powerswitch.pid", "powerswitch.log"
HOST_SWITCH_KEY = "/etc/congressctl/powerswitch.key"
FENCE_AGENT = "fence_congresslab"
SWITCH_READY_S = 15.0
REDIS_DISK_MB = 64
# A booted host starts its cluster stack this long after power-on, as a machine's firmware and OS take a while:
# one that rejoined a second after being fenced aborted the survivors' recovery and took the DSD back (18.9 s
# to the first action instead of ~5, seen in dsd-node-fail).
BOOT_DELAY_S = 10
OWN_FILES = ("lab.json", "inventory.yaml", "id_ed25519", "id_ed25519.pub", "known_hosts",
             SWITCH_KEY, SWITCH_PID, SWITCH_LOG)


@dataclass
class LabHost:
    name: str
    address: str
    netns: str
    pid: int            # the host's PID 1 (the holder) as seen from the machine


@dataclass
class Lab:
    name: str
    dir: Path
    subnet: str
    bridge: str
    vip: str
    hosts: list[LabHost]
    inventory: Path
    key: Path
    known_hosts: Path

    @property
    def gateway(self) -> str:
        """The machine's address on the lab bridge (where the power switch listens)."""
        return self.subnet.replace(".0/24", ".1")

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabError(f"lab {self.name} has no host {name} (hosts: {', '.join(h.name for h in self.hosts)})",
                       host=name)


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    comm: str
    net: int                # inode of its network namespace
    pidns: int              # inode of its PID namespace
    nspid: tuple[int, ...]  # its pid in each PID namespace it belongs to, outermost first


# ---------------------------------------------------------------------------------------------- public API

def check_capabilities() -> None:
    """Raise LabError (exit 2) naming what is missing when this machine cannot run a lab."""
    if not sys.platform.startswith("linux"):
        raise LabError("the lab needs Linux (network, mount and PID namespaces)")
    if os.geteuid() != 0:
        raise LabError("the lab needs root: it creates network namespaces, a bridge and mounts (run it as root)")
    missing = [t for t in TOOLS if shutil.which(t, path=HOST_ENV["PATH"]) is None]
    if not SSHD.exists():
        missing.append(str(SSHD))
    if missing:
        raise LabError(f"missing tools: {', '.join(missing)} "
                       "(install iproute2, util-linux, mount, openssh-server and openssh-client)")
    if "overlay" not in Path("/proc/filesystems").read_text().split():
        raise LabError("the kernel has no overlay filesystem (try: modprobe overlay)")
    probe = _run(["unshare", "--net", "--mount", "--uts", "--ipc", "--pid", "--fork", "true"], check=False)
    if probe.returncode != 0:
        raise LabError("cannot create namespaces on this machine "
                       f"({probe.stderr.decode(errors='replace').strip()}); the lab needs a host or VM where root may")


def lab_up(nodes: int = 3, name: str = "lab", dir: Path | None = None) -> Lab:
    """Make `nodes` hosts named n1..nN; first removes whatever a previous lab of this name left behind."""
    check_capabilities()
    _check_name(name)
    if not MIN_NODES <= nodes <= MAX_NODES:
        raise LabError(f"a lab has {MIN_NODES} to {MAX_NODES} hosts, not {nodes}", field="nodes")
    dir = _lab_dir(name, dir)
    _check_dir(dir)
    with _registry_lock():
        _teardown(name, dir)
        owns_dir = not dir.exists()
        dir.mkdir(parents=True, exist_ok=True)
        lab = _plan(name, dir, nodes, _pick_octet(name))
        _save(lab, owns_dir)
        try:
            _build(lab)
            _save(lab, owns_dir)
            _start_switch(lab)
        except BaseException:
            with contextlib.suppress(Exception):
                _teardown(name, dir)
            raise
    return lab


def lab_down(name: str = "lab", dir: Path | None = None) -> list[str]:
    """Stop every process of the lab and remove its namespaces, links and state; returns what was removed."""
    check_capabilities()
    _check_name(name)
    with _registry_lock():
        return _teardown(name, _lab_dir(name, dir))


def lab_load(name: str = "lab", dir: Path | None = None) -> Lab:
    """The lab recorded in <dir>/lab.json, or (without dir) wherever the machine-wide registry says it is."""
    record = _read_json(_lab_dir(name, dir) / "lab.json")
    if record is None and dir is None:
        record = _read_json(REGISTRY_DIR / f"{name}.json")
    if record is None or record.get("name") != name:
        where = f" in {dir}" if dir is not None else ""
        raise LabError(f"no lab named {name}{where} (run: congressctl lab up --name {name})")
    return _from_json(record)


def lab_names() -> list[str]:
    """Names of the labs registered on this machine (up, or left behind by a crash)."""
    if not REGISTRY_DIR.is_dir():
        return []
    return sorted(p.stem for p in REGISTRY_DIR.glob("*.json"))


def lab_status(name: str = "lab", dir: Path | None = None) -> list[dict]:
    """One row per host: name, address, netns, pid, alive (PID 1 running), sshd_pid, reachable (SSH banner)."""
    lab = lab_load(name, dir)
    with ThreadPoolExecutor(max_workers=len(lab.hosts)) as pool:
        reachable = list(pool.map(lambda h: _ssh_banner(h.address, 2.0), lab.hosts))
    procs = _scan()
    rows = []
    for h, ok in zip(lab.hosts, reachable):
        holder = _holder(procs, h)
        rows.append({
            "name": h.name, "address": h.address, "netns": h.netns, "pid": h.pid,
            "alive": holder is not None,
            "sshd_pid": _sshd_pid(procs, holder) if holder else None,
            "reachable": ok,
        })
    return rows


def lab_exec_argv(lab: Lab, host: str, argv: list[str]) -> list[str]:
    """The command line that runs argv inside a host (for a CLI that wants to exec it with its own terminal)."""
    h = lab.host(host)
    if _holder(_scan(), h) is None:
        _refresh_pids(lab)   # the power switch may have booted it again since `lab` was loaded
    if _holder(_scan(), h) is None:
        raise LabError(f"host is not running (pid {h.pid}); power it on (congressctl lab power on {host}) or "
                       f"run: congressctl lab up --name {lab.name}", host=host)
    return ["nsenter", "-t", str(h.pid), "-n", "-m", "-u", "-i", "-p", "--", *argv]


def lab_exec(lab: Lab, host: str, argv: list[str], timeout: float | None = 60, input: bytes | None = None,
             stream: bool = False) -> subprocess.CompletedProcess:
    """Run argv inside a host (its net, mount, uts, ipc and pid namespaces) with a login-like environment.

    Captures stdout/stderr unless stream=True (then they are inherited). A non-zero exit is returned, not raised;
    a timeout kills the command and raises LabError. As with ssh, a daemon started here must not keep the
    captured stdout/stderr open (redirect it), or this waits for the daemon.
    """
    cmd = lab_exec_argv(lab, host, argv)
    pipe = None if stream else subprocess.PIPE
    stdin = subprocess.PIPE if input is not None else (None if stream else subprocess.DEVNULL)
    proc = subprocess.Popen(cmd, stdin=stdin, stdout=pipe, stderr=pipe, env=_env_for_exec(stream), cwd="/")
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_descendants(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=5)
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        raise LabError(f"{shlex.join(argv)} did not finish within {timeout} s (killed)", host=host) from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def power(lab: Lab, action: str, host: str) -> powerswitch.Answer:
    """Ask the lab's power switch to switch a host (on, off, reboot) or say its state (status), as the fence
    agent does; raises PowerSwitchError if the switch refuses or cannot be reached."""
    lab.host(host)
    key = _switch_key(lab)
    return powerswitch.send(address=lab.gateway, key=key, action=action, plug=host)


def switch_status(name: str = "lab", dir: Path | None = None) -> dict:
    """The lab's power switch: where it listens, its pid, whether it runs, where it logs."""
    lab = lab_load(name, dir)
    pid = _switch_pid(lab.dir)
    return {"address": f"{lab.gateway}:{powerswitch.PORT}", "pid": pid, "running": pid is not None,
            "log": str(lab.dir / SWITCH_LOG)}


def serve_power_switch(name: str, dir: Path) -> None:
    """The power switch daemon's body (lab up starts it detached); returns only if it cannot listen."""
    lab = lab_load(name, dir)
    logging.basicConfig(filename=lab.dir / SWITCH_LOG, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    powerswitch.serve(address=lab.gateway, key=_switch_key(lab), power=LabPower(name, lab.dir),
                      pid_file=lab.dir / SWITCH_PID)


class LabPower:
    """The switch's view of a lab's hosts (powerswitch.Power): lab.json is read again for each request, as the
    pids in it change with each boot."""

    def __init__(self, name: str, dir: Path):
        self.name, self.dir = name, dir

    def _lab(self) -> Lab:
        return lab_load(self.name, self.dir)

    def plugs(self) -> list[str]:
        return [h.name for h in self._lab().hosts]

    def is_on(self, plug: str) -> bool:
        return _holder(_scan(), self._lab().host(plug)) is not None

    def off(self, plug: str) -> None:
        power_off(self._lab(), plug)

    def on(self, plug: str) -> None:
        power_on(self._lab(), plug)


def power_off(lab: Lab, host: str) -> None:
    """Every process of the host dies at once, as in a power loss (its PID 1 gets SIGKILL). Returns once none
    is left; nothing if it was off."""
    h = lab.host(host)
    holder = _holder(_scan(), h)
    if holder is None:
        return
    _signal_all({holder.pid}, signal.SIGKILL)
    if not _wait_until(lambda: not [p for p in _scan() if p.pidns == holder.pidns], KILL_WAIT_S):
        raise LabError(f"processes of the host survived its power-off for {KILL_WAIT_S:.0f} s", host=host)


def power_on(lab: Lab, host: str) -> None:
    """Boot a host that is off: its network as at boot (no extra address, rule or qdisc), its PID 1 started
    again, which mounts its disk and starts its cluster stack if deploy installed it. Returns once its sshd
    answers; nothing if it was on."""
    h = lab.host(host)
    if _holder(_scan(), h) is not None:
        return
    _reset_network(h)
    h.pid = 0
    _start_holder(lab, h)
    _wait_ready(lab, [h])
    _record_pid(lab, h)


# ---------------------------------------------------------------------------------------------- building

def _plan(name: str, dir: Path, nodes: int, octet: int) -> Lab:
    net = f"10.213.{octet}"
    hosts = [LabHost(f"n{i}", f"{net}.{FIRST_HOST_OCTET + i - 1}", f"{name}-n{i}", 0) for i in range(1, nodes + 1)]
    return Lab(name=name, dir=dir, subnet=f"{net}.0/24", bridge=f"clb-{name}", vip=f"{net}.{VIP_OCTET}",
               hosts=hosts, inventory=dir / "inventory.yaml", key=dir / "id_ed25519",
               known_hosts=dir / "known_hosts")


def _build(lab: Lab) -> None:
    _keygen(lab.key, f"congressctl-lab-{lab.name}")
    client_pub = lab.key.with_suffix(".pub").read_text()
    _write(lab.dir / SWITCH_KEY, secrets.token_hex(32) + "\n", 0o600)
    run_seed = lab.dir / "hosts" / ".run-seed"
    _make_run_seed(run_seed)
    host_keys = {h.name: _prepare_host(lab, h, client_pub, run_seed) for h in lab.hosts}
    _make_network(lab)
    for h in lab.hosts:
        _start_holder(lab, h)
    _wait_ready(lab, lab.hosts)
    _write(lab.known_hosts, "".join(f"{h.address} {host_keys[h.name]}\n" for h in lab.hosts), 0o644)
    _write(lab.inventory, yaml.safe_dump(_inventory(lab), sort_keys=False, default_flow_style=None, width=120), 0o644)


def _host_dir(lab: Lab, h: LabHost) -> Path:
    return lab.dir / "hosts" / h.name


def _prepare_host(lab: Lab, h: LabHost, client_pub: str, run_seed: Path) -> str:
    """Write the host's private layers, sshd config and setup script; returns its public host key."""
    root = _host_dir(lab, h)
    overlays = [_make_layer(root / "layers" / target.strip("/"), target) for target in OVERLAID]
    home = root / "home"
    home.mkdir(mode=0o700, parents=True)
    etc = root / "layers" / "etc" / "upper"
    _write(etc / "hostname", f"{h.name}\n", 0o644)
    _write(etc / "hosts", _etc_hosts(lab), 0o644)
    _write(etc / "machine-id", f"{uuid.uuid4().hex}\n", 0o444)
    _unlock_root(etc)
    ssh = etc / "ssh"
    ssh.mkdir()
    ssh.chmod(0o755)
    _keygen(ssh / "ssh_host_ed25519_key", f"root@{h.name}")
    _hide_machine_host_keys(ssh)
    authorized = "/etc/ssh/lab_authorized_keys"
    _write(ssh / "lab_authorized_keys", client_pub, 0o600)
    _write(ssh / "sshd_config", render_template("lab-sshd_config.j2", host=h.name, address=h.address,
                                                port=SSH_PORT, authorized_keys=authorized), 0o644)
    _write(etc / "congressctl" / "powerswitch.key", (lab.dir / SWITCH_KEY).read_text(), 0o600)
    (etc / "congressctl").chmod(0o755)
    redis_disk = root / "redis-disk"
    redis_disk.mkdir()
    _run(["mount", "-t", "tmpfs", "-o", f"size={REDIS_DISK_MB}m,mode=0755", f"lab-{h.netns}-redis", str(redis_disk)])
    _write(root / "setup.sh", render_template("lab-host-setup.sh.j2", host=h.name, overlays=overlays,
                                              home=str(home), run_seed=str(run_seed), redis_disk=str(redis_disk),
                                              cluster_script=CLUSTER_SCRIPT, boot_delay_s=BOOT_DELAY_S), 0o700)
    algo, key = (ssh / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    return f"{algo} {key}"


def _make_layer(layer: Path, target: str) -> dict:
    upper, work = layer / "upper", layer / "work"
    upper.mkdir(parents=True)
    work.mkdir()
    st = os.stat(target)
    os.chown(upper, st.st_uid, st.st_gid)
    upper.chmod(stat.S_IMODE(st.st_mode))
    return {"target": target, "options": f"lowerdir={target},upperdir={upper},workdir={work}"}


def _make_run_seed(seed: Path) -> None:
    """The directory skeleton of the machine's /run (owners and modes, no files), copied into each host's /run."""
    seed.mkdir(parents=True)
    seed.chmod(0o755)
    for src in _run_dirs(Path("/run"), depth=2):
        dst = seed / src.relative_to("/run")
        st = src.lstat()
        dst.mkdir()
        os.chown(dst, st.st_uid, st.st_gid)
        dst.chmod(stat.S_IMODE(st.st_mode))
    for sub, mode in (("sshd", 0o755), ("lock", 0o1777)):
        (seed / sub).mkdir(exist_ok=True)
        (seed / sub).chmod(mode)


def _run_dirs(top: Path, depth: int) -> list[Path]:
    found = []
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir(top), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False) and not (top == Path("/run") and entry.name in SKIPPED_RUN_DIRS):
                found.append(Path(entry.path))
                if depth > 1:
                    found.extend(_run_dirs(Path(entry.path), depth - 1))
    return found


def _hide_machine_host_keys(ssh: Path) -> None:
    """Whiteouts over the machine's own host keys, so a host shows only its own key in /etc/ssh."""
    for key in Path("/etc/ssh").glob("ssh_host_*"):
        if not (ssh / key.name).exists():
            os.mknod(ssh / key.name, stat.S_IFCHR, os.makedev(0, 0))


def _unlock_root(etc_upper: Path) -> None:
    """With UsePAM no, sshd refuses a locked account ('!' password); keys-only root login needs it unlocked."""
    shadow = Path("/etc/shadow")
    lines = shadow.read_text().splitlines(keepends=True)
    fields = next((ln.split(":") for ln in lines if ln.startswith("root:")), None)
    if fields is None or not fields[1].startswith("!"):
        return
    fields[1] = "*"
    patched = [":".join(fields) if ln.startswith("root:") else ln for ln in lines]
    st = shadow.stat()
    _write(etc_upper / "shadow", "".join(patched), stat.S_IMODE(st.st_mode))
    os.chown(etc_upper / "shadow", st.st_uid, st.st_gid)


def _etc_hosts(lab: Lab) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{h.address}\t{h.name}" for h in lab.hosts]
    return "\n".join(lines) + "\n"


def _make_network(lab: Lab) -> None:
    gateway = lab.subnet.replace(".0/24", ".1/24")
    _ip("link", "add", lab.bridge, "type", "bridge")
    _ip("addr", "add", gateway, "dev", lab.bridge)
    _ip("link", "set", lab.bridge, "up")
    for h in lab.hosts:
        _ip("netns", "add", h.netns)
        _ip("link", "add", h.netns, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
        _ip("link", "set", h.netns, "master", lab.bridge, "up")
        _ip("-n", h.netns, "link", "set", "lo", "up")
        _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0")
        _ip("-n", h.netns, "link", "set", "eth0", "up")


def _start_holder(lab: Lab, h: LabHost) -> None:
    """Start the host's PID 1, detached from us (setsid -f) so the lab outlives the process that made it."""
    root = _host_dir(lab, h)
    cmd = ["setsid", "-f", "ip", "netns", "exec", h.netns,
           "unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "--mount-proc", "--propagation", "slave",
           "--", "/bin/bash", str(root / "setup.sh")]
    with open(root / "holder.log", "ab") as log:   # one log across the host's boots
        subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=HOST_ENV,
                       cwd="/", timeout=CMD_TIMEOUT_S, check=True)


def _reset_network(h: LabHost) -> None:
    """What a reboot resets in a host's network namespace (which outlives its processes): addresses (a VIP
    IPaddr2 added), link state, nftables rules and qdiscs a fault left."""
    _ip("-n", h.netns, "addr", "flush", "dev", "eth0")
    _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0")
    _ip("-n", h.netns, "link", "set", "eth0", "up")
    _ip("-n", h.netns, "link", "set", "lo", "up")
    if shutil.which("nft", path=HOST_ENV["PATH"]):
        _run(["ip", "netns", "exec", h.netns, "nft", "flush", "ruleset"], check=False)
    _run(["tc", "-n", h.netns, "qdisc", "del", "dev", "eth0", "root"], check=False)   # fails when none: fine


def _record_pid(lab: Lab, h: LabHost) -> None:
    record = _read_json(lab.dir / "lab.json")
    if record is None:
        raise LabError(f"{lab.dir / 'lab.json'} is gone: is the lab being torn down?", host=h.name)
    lab.hosts = [h if other.name == h.name else other for other in _from_json(record).hosts]
    _save(lab, bool(record.get("owns_dir")))


def _refresh_pids(lab: Lab) -> None:
    record = _read_json(lab.dir / "lab.json")
    if record is None:
        return
    pids = {h["name"]: h["pid"] for h in record.get("hosts", [])}
    for h in lab.hosts:
        h.pid = pids.get(h.name, h.pid)


# ---------------------------------------------------------------------------------------------- power switch

def _start_switch(lab: Lab) -> None:
    """Start the power switch detached (setsid -f: it outlives lab up) and wait until it listens."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = {**HOST_ENV, "PYTHONPATH": package_parent}
    cmd = ["setsid", "-f", sys.executable, "-m", "congressctl.cli", "lab", "power-switch",
           "--name", lab.name, "--dir", str(lab.dir)]
    with open(lab.dir / SWITCH_LOG, "ab") as log:
        subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/",
                       timeout=CMD_TIMEOUT_S, check=True)
    if not _wait_until(lambda: _switch_pid(lab.dir) is not None and _listening(lab.gateway), SWITCH_READY_S):
        raise LabError(f"the power switch did not start within {SWITCH_READY_S:.0f} s: "
                       f"{_tail(lab.dir / SWITCH_LOG)}")


def _stop_switch(dir: Path) -> list[str]:
    pid = _switch_pid(dir)
    if pid is None:
        return []
    _signal_all({pid}, signal.SIGTERM)
    if not _wait_until(lambda: _switch_pid(dir) is None, GRACE_S):
        _signal_all({pid}, signal.SIGKILL)
        _wait_until(lambda: _switch_pid(dir) is None, KILL_WAIT_S)
    return [f"power switch {pid}"]


def _switch_pid(dir: Path) -> int | None:
    """The pid in dir's power switch pid file, if that process runs and is this lab's switch (pids are reused)."""
    try:
        pid = int((dir / SWITCH_PID).read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    ours = b"power-switch" in cmdline and str(dir).encode() in cmdline
    return pid if ours and state != "Z" else None


def _switch_key(lab: Lab) -> bytes:
    try:
        return (lab.dir / SWITCH_KEY).read_text().strip().encode()
    except OSError as e:
        raise LabError(f"the lab's power switch key is unreadable: {e}") from None


def _listening(address: str) -> bool:
    try:
        with socket.create_connection((address, powerswitch.PORT), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-5:]) or "empty log"
    except OSError:
        return "no log"


def _wait_ready(lab: Lab, hosts: list[LabHost]) -> None:
    """Until each host's PID 1 is found and its sshd answers with an SSH banner."""
    started = time.monotonic()
    pending = list(hosts)
    while pending:
        procs = _scan()
        for h in list(pending):
            _check_started(lab, h, procs, time.monotonic() - started)
            if h.pid and _ssh_banner(h.address, 0.5):
                pending.remove(h)
        if pending and time.monotonic() - started > READY_TIMEOUT_S:
            h = pending[0]
            raise LabError(f"host did not become ready within {READY_TIMEOUT_S:.0f} s: {_log_tail(lab, h)}",
                           host=h.name)
        if pending:
            time.sleep(0.1)


def _check_started(lab: Lab, h: LabHost, procs: list[_Proc], elapsed: float) -> None:
    if not h.pid:
        holder = _find_holder(procs, h.netns)
        h.pid = holder.pid if holder else 0
    if h.pid and _holder(procs, h) is None:
        raise LabError(f"host stopped while starting: {_log_tail(lab, h)}", host=h.name)
    if not h.pid and elapsed > 5 and not _in_netns(procs, h.netns):
        raise LabError(f"host did not start: {_log_tail(lab, h)}", host=h.name)


def _log_tail(lab: Lab, h: LabHost) -> str:
    try:
        lines = (_host_dir(lab, h) / "holder.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " | ".join(lines[-5:]) or "empty log"


def corosync_realtime(hosts: int, cores: int | None = None) -> bool:
    """Whether the lab's corosyncs keep corosync's realtime scheduling: they all share this machine's cores.

    Seen on 2 cores: 12 realtime corosyncs starved pacemaker and each other, and the cluster never formed
    (it formed at once without); 3 realtime ones detect and recover from a lost host faster (dsd-node-fail
    3.3-4.4 s, against 5.1-5.3 s without).
    """
    return hosts <= 2 * (cores or os.cpu_count() or 1)


def _inventory(lab: Lab) -> dict:
    """The default layout: the first three hosts carry the replicated bus (behind its own VIP), the DSD prefers
    n2 and n3, and the CIB keeps the promoted Redis, the DSD and the API VIP apart where it can."""
    names = [h.name for h in lab.hosts]
    data = generate(len(lab.hosts), cluster=lab.name, subnet=lab.subnet.rsplit(".", 1)[0], vip=lab.vip,
                    dsd_preference=names[1:3] + names[:1], sched_rr=corosync_realtime(len(lab.hosts)),
                    ssh={"user": "root", "port": SSH_PORT, "key": lab.key.name, "known_hosts": lab.known_hosts.name})
    # as production should: fencing on, through the lab's power switch
    data["pacemaker"]["fencing"] = {"devices": [{
        "name": "lab", "agent": FENCE_AGENT, "hosts": names,
        "params": {"ipaddr": lab.gateway, "ipport": str(powerswitch.PORT), "key_file": HOST_SWITCH_KEY},
    }]}
    # failover-test's action sink listens on this machine's bridge address, on a port of its own
    data["datasources"] = {"allowed_urls": [f"http://{lab.gateway}:"]}
    return data


# ---------------------------------------------------------------------------------------------- teardown

def _teardown(name: str, dir: Path) -> list[str]:
    """Remove everything a lab of this name may have left: processes, netns, veths, bridge, state, registry."""
    records = [r for r in (_read_json(REGISTRY_DIR / f"{name}.json"), _read_json(dir / "lab.json"))
               if r is not None and r.get("name") == name]
    netns = sorted(set(_netns_named(name)) | {h["netns"] for r in records for h in r.get("hosts", [])})
    known_holders = {h["pid"] for r in records for h in r.get("hosts", []) if h.get("pid")}
    removed = []
    for state_dir in {r["dir"] for r in records} | {str(dir)}:
        removed += _stop_switch(Path(state_dir))   # first: it must not boot a host being stopped
    removed += _stop_processes(netns, known_holders)
    for link in [*netns, f"clb-{name}"]:   # a host's veth is named like its netns; deleting it deletes its eth0
        if _delete_link(link):
            removed.append(f"link {link}")
    for ns in netns:
        if (NETNS_DIR / ns).exists():
            _ip("netns", "delete", ns)
            removed.append(f"netns {ns}")
    for r in records:
        removed += _unmount_disks(Path(r["dir"]), [h["name"] for h in r.get("hosts", [])])
    for state_dir, owned in {(r["dir"], bool(r.get("owns_dir"))) for r in records}:
        removed += _remove_state(Path(state_dir), owned)
    registry = REGISTRY_DIR / f"{name}.json"
    if registry.exists():
        registry.unlink()
        removed.append(f"registry {registry}")
    return removed


def _unmount_disks(dir: Path, hosts: list[str]) -> list[str]:
    removed = []
    for host in hosts:
        disk = dir / "hosts" / host / "redis-disk"
        if os.path.ismount(disk):
            _run(["umount", str(disk)])
            removed.append(f"mount {disk}")
    return removed


def _delete_link(link: str) -> bool:
    """Delete a network link of the root namespace; False if it was not there (veths vanish with their netns)."""
    if not Path("/sys/class/net", link).exists():
        return False
    done = _run(["ip", "link", "delete", link], check=False)
    if done.returncode != 0 and Path("/sys/class/net", link).exists():
        raise LabError(f"ip link delete {link} failed: {done.stderr.decode(errors='replace').strip()}")
    return done.returncode == 0


def _stop_processes(netns: list[str], known_holders: set[int]) -> list[str]:
    """SIGTERM every process of the hosts, wait up to GRACE_S, then SIGKILL each host's PID 1 and any rest."""
    inodes = {ino for ino in (_ns_inode(ns) for ns in netns) if ino is not None}
    depth = len(_self_nspid())
    procs = _scan()
    holders = [p for p in procs if _is_holder(p, depth) and (p.net in inodes or p.pid in known_holders)]
    holder_pids = {p.pid for p in holders}
    host_pidns = {p.pidns for p in holders}

    def members() -> list[_Proc]:
        return [p for p in _scan() if p.net in inodes or p.pidns in host_pidns or p.pid in holder_pids]

    everyone = members()
    starters = {p.ppid for p in holders}    # `unshare --fork` ignores SIGTERM; it exits when its PID 1 does
    victims = {p.pid for p in everyone if p.pid not in holder_pids | starters}
    _signal_all(victims, signal.SIGTERM)
    _wait_until(lambda: not victims & {p.pid for p in members()}, GRACE_S)
    _signal_all(holder_pids, signal.SIGKILL)
    _signal_all({p.pid for p in members()}, signal.SIGKILL)
    if not _wait_until(lambda: not members(), KILL_WAIT_S):
        left = ", ".join(f"{p.pid} ({p.comm})" for p in members())
        raise LabError(f"processes survived SIGKILL: {left}")
    return [f"process {p.pid} ({p.comm})" for p in everyone]


def _remove_state(dir: Path, owned: bool) -> list[str]:
    if not dir.exists():
        return []
    mounted = _mounts_under(dir)
    if mounted:
        raise LabError(f"refusing to remove {dir}: mounts under it on this machine: {', '.join(mounted)}")
    if owned:
        shutil.rmtree(dir)
        return [f"dir {dir}"]
    removed = []
    for name in OWN_FILES:
        if (dir / name).exists():
            (dir / name).unlink()
            removed.append(f"file {dir / name}")
    if (dir / "hosts").exists():
        shutil.rmtree(dir / "hosts")
        removed.append(f"dir {dir / 'hosts'}")
    return removed


def _mounts_under(dir: Path) -> list[str]:
    prefix = str(dir.resolve()).rstrip("/") + "/"
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if (p + "/").startswith(prefix)]


def _signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_until(done: Callable[[], bool], limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_descendants(pid: int) -> None:
    """SIGKILL every descendant of pid (not pid itself, so it can reap them and exit on its own)."""
    children: dict[int, list[int]] = {}
    for p in _scan():
        children.setdefault(p.ppid, []).append(p.pid)
    stack, tree = list(children.get(pid, [])), set()
    while stack:
        current = stack.pop()
        tree.add(current)
        stack.extend(children.get(current, []))
    _signal_all(tree, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- processes

def _scan() -> list[_Proc]:
    procs = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            net = os.stat(f"/proc/{entry}/ns/net").st_ino
            pidns = os.stat(f"/proc/{entry}/ns/pid").st_ino
            status = _status(int(entry))
        except (OSError, ValueError):
            continue
        nspid = tuple(int(x) for x in status.get("NSpid", entry).split())
        procs.append(_Proc(int(entry), int(status.get("PPid", "0")), status.get("Name", "?"), net, pidns, nspid))
    return procs


def _status(pid: int | str) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _self_nspid() -> tuple[int, ...]:
    return tuple(int(x) for x in _status("self")["NSpid"].split())


def _is_holder(p: _Proc, depth: int) -> bool:
    return len(p.nspid) == depth + 1 and p.nspid[-1] == 1


def _find_holder(procs: list[_Proc], netns: str) -> _Proc | None:
    ino = _ns_inode(netns)
    depth = len(_self_nspid())
    return next((p for p in procs if p.net == ino and _is_holder(p, depth)), None)


def _holder(procs: list[_Proc], h: LabHost) -> _Proc | None:
    """The host's PID 1 if it is still the process recorded for it."""
    ino = _ns_inode(h.netns)
    depth = len(_self_nspid())
    return next((p for p in procs if p.pid == h.pid and p.net == ino and _is_holder(p, depth)), None)


def _in_netns(procs: list[_Proc], netns: str) -> bool:
    ino = _ns_inode(netns)
    return ino is not None and any(p.net == ino for p in procs)


def _sshd_pid(procs: list[_Proc], holder: _Proc) -> int | None:
    try:
        inner = int((Path(f"/proc/{holder.pid}/root/run/sshd.pid")).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return next((p.pid for p in procs if p.pidns == holder.pidns and p.nspid[-1] == inner), None)


def _ns_inode(netns: str) -> int | None:
    try:
        return os.stat(NETNS_DIR / netns).st_ino
    except OSError:
        return None


def _netns_named(name: str) -> list[str]:
    pattern = re.compile(rf"^{re.escape(name)}-n\d+$")
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if pattern.match(p.name))


# ---------------------------------------------------------------------------------------------- small helpers

def _check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise LabError(f"lab name {name!r} must match {NAME_RE.pattern} (it names a bridge clb-<name>)", field="name")


def _lab_dir(name: str, dir: Path | None) -> Path:
    return Path(dir).absolute() if dir is not None else Path.cwd() / name


def _check_dir(dir: Path) -> None:
    real = str(dir.resolve())
    for top in FORBIDDEN_DIR_ROOTS:
        if real == top or real.startswith(top + "/"):
            raise LabError(f"lab dir {dir} is under {top}, which every lab host replaces with its own copy; "
                           "choose a dir elsewhere (e.g. under /root, /srv or /tmp)", field="dir")
    if re.search(r"[,:\n]", real):
        raise LabError(f"lab dir {dir} must not contain ',', ':' or newlines (overlay mount options)", field="dir")


def _pick_octet(name: str) -> int:
    """Third octet of 10.213.x.0/24: 0 for the default lab, else derived from the name, skipping ones in use."""
    preferred = 0 if name == "lab" else 1 + zlib.crc32(name.encode()) % 254
    used = _octets_in_use()
    for other in lab_names():
        record = _read_json(REGISTRY_DIR / f"{other}.json")
        if other != name and record:
            used.add(int(record["subnet"].split(".")[2]))
    for i in range(255):
        octet = (preferred + i) % 255
        if octet not in used:
            return octet
    raise LabError("no free 10.213.x.0/24 subnet for another lab")


def _octets_in_use() -> set[int]:
    out = json.loads(_ip("-j", "-4", "addr", "show").stdout or b"[]")
    return {int(a["local"].split(".")[2]) for link in out for a in link.get("addr_info", [])
            if a.get("local", "").startswith("10.213.")}


def _ssh_banner(address: str, timeout: float) -> bool:
    try:
        with socket.create_connection((address, SSH_PORT), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _keygen(path: Path, comment: str) -> None:
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _ip(*args: str) -> subprocess.CompletedProcess:
    return _run(["ip", *args])


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(cmd, capture_output=True, env=HOST_ENV, timeout=CMD_TIMEOUT_S, stdin=subprocess.DEVNULL,
                              check=False)
    except subprocess.TimeoutExpired:
        raise LabError(f"{shlex.join(cmd)} did not finish within {CMD_TIMEOUT_S:.0f} s") from None
    except OSError as e:
        raise LabError(f"{shlex.join(cmd)}: {e}") from None
    if check and done.returncode != 0:
        raise LabError(f"{shlex.join(cmd)} failed: {done.stderr.decode(errors='replace').strip()}")
    return done


def _env_for_exec(stream: bool) -> dict[str, str]:
    env = dict(HOST_ENV)
    if stream and "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    return env


def _write(path: Path, text: str, mode: int) -> None:
    atomic_write(path, text.encode(), mode)


@contextlib.contextmanager
def _registry_lock() -> Iterator[None]:
    """One lab up/down at a time on this machine (subnet choice and name-derived links must not race)."""
    REGISTRY_DIR.mkdir(mode=0o755, exist_ok=True)
    with open(REGISTRY_DIR / ".lock", "w") as f:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LabError(f"another lab up/down held {REGISTRY_DIR / '.lock'} for "
                                   f"{LOCK_TIMEOUT_S:.0f} s") from None
                time.sleep(0.2)
        yield


def _save(lab: Lab, owns_dir: bool) -> None:
    record = {
        "name": lab.name, "dir": str(lab.dir), "owns_dir": owns_dir, "subnet": lab.subnet, "bridge": lab.bridge,
        "vip": lab.vip, "hosts": [asdict(h) for h in lab.hosts],
    }
    text = json.dumps(record, indent=2) + "\n"
    _write(lab.dir / "lab.json", text, 0o644)
    _write(REGISTRY_DIR / f"{lab.name}.json", text, 0o644)


def _from_json(record: dict) -> Lab:
    dir = Path(record["dir"])
    lab = _plan(record["name"], dir, len(record["hosts"]), int(record["subnet"].split(".")[2]))
    lab.hosts = [LabHost(**h) for h in record["hosts"]]
    return lab


def _read_json(path: Path) -> dict | None:
    try:
        record: dict = json.loads(path.read_text())   # _save writes an object
    except (OSError, ValueError):
        return None
    return record
