"""The congress-bus OCF agent against real redis-servers on loopback: a stale replica refuses to be promoted,
the most current one is promoted with every acknowledged write, and a demoted master takes no write."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from conftest import free_port, require
from fixtures_redis import REPO, wait_for

AGENT = REPO / "templates" / "ocf" / "congress-bus"
OCF_SUCCESS, OCF_ERR_GENERIC, OCF_NOT_RUNNING, OCF_RUNNING_PROMOTED = 0, 1, 7, 8


@dataclass
class Instance:
    name: str
    port: int
    dir: Path
    password: str

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5,
                           socket_connect_timeout=2, decode_responses=True)

    def replication(self) -> dict:
        return self.client().info("replication")

    def write_conf(self) -> Path:
        conf = self.dir / "redis.conf"
        conf.write_text("\n".join([
            "bind 127.0.0.1", f"port {self.port}", f"dir {self.dir}", "appendonly yes", "save ''",
            f"requirepass {self.password}", f"masterauth {self.password}", "replica-read-only yes",
            "repl-diskless-sync yes", "repl-diskless-sync-delay 0", "repl-ping-replica-period 1",
            "repl-timeout 5", ""]))
        conf.chmod(0o600)
        return conf


class BusAgent:
    """Runs the agent's actions as Pacemaker (or ocf-tester) would: OCF_RESKEY_* in the environment."""

    def __init__(self, instance: Instance, master: Instance, peers: list[Instance], password_file: Path):
        self.instance = instance
        self.env = {
            **os.environ, "OCF_ROOT": "/usr/lib/ocf", "OCF_RESOURCE_INSTANCE": f"bus-{instance.name}",
            "OCF_RESKEY_config": str(instance.write_conf()), "OCF_RESKEY_port": str(instance.port),
            "OCF_RESKEY_bus_address": f"127.0.0.1:{master.port}",
            "OCF_RESKEY_peers": " ".join(f"{p.name}=127.0.0.1:{p.port}" for p in peers),
            "OCF_RESKEY_password_file": str(password_file), "OCF_RESKEY_user": "root",
            "OCF_RESKEY_pidfile": str(instance.dir / "redis.pid"),
            "OCF_RESKEY_logfile": str(instance.dir / "redis.log"),
        }

    def run(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(AGENT), action], env=self.env, capture_output=True, text=True, timeout=60)

    @property
    def pid(self) -> int:
        return int((self.instance.dir / "redis.pid").read_text())


@pytest.fixture
def bus(tmp_path: Path):
    """A master M (plain redis-server) and replicas A and B started by the agent, both in sync."""
    require(shutil.which("redis-server") is not None, "redis-server is not installed (make install)")
    require(Path("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs").exists(), "resource-agents is not installed")
    password = secrets.token_hex(16)
    password_file = tmp_path / "bus.password"
    password_file.write_text(password + "\n")
    m, a, b = (Instance(name, free_port(), tmp_path / name, password) for name in ("m", "a", "b"))
    for instance in (m, a, b):
        instance.dir.mkdir()
    master = subprocess.Popen(["redis-server", str(m.write_conf())], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    agents = {i.name: BusAgent(i, m, [m, a, b], password_file) for i in (a, b)}
    try:
        wait_for(lambda: m.client().ping(), 10, what="master M")
        for agent in agents.values():
            started = agent.run("start")
            assert started.returncode == OCF_SUCCESS, started.stderr
        for replica in (a, b):
            wait_for(lambda: replica.replication()["master_link_status"] == "up", 15, what=f"{replica.name} in sync")
        yield m, master, a, b, agents
    finally:
        for agent in agents.values():
            agent.run("stop")       # a frozen one too: stop SIGKILLs it
        if master.poll() is None:
            master.kill()
        master.wait(timeout=5)


def _online_replicas(m: Instance) -> int:
    info = m.replication()
    return sum(1 for k, v in info.items() if k.startswith("slave") and isinstance(v, dict) and v["state"] == "online")


def test_a_stale_replica_refuses_promotion_and_the_current_one_keeps_every_acknowledged_write(bus) -> None:
    m, master, a, b, agents = bus
    # B stops taking the stream: frozen, and its link cut so that nothing more waits for it in a socket.
    os.kill(agents["b"].pid, signal.SIGSTOP)
    m.client().execute_command("CLIENT", "KILL", "TYPE", "replica")
    wait_for(lambda: _online_replicas(m) == 1 and a.replication()["master_link_status"] == "up", 15,
             what="A back in sync with M")
    writer = m.client()
    for i in range(20):
        writer.set(f"acked-{i}", i)
        assert writer.execute_command("WAIT", 1, 2000) >= 1     # A has it
    master.kill()
    master.wait(timeout=5)
    os.kill(agents["b"].pid, signal.SIGCONT)
    wait_for(lambda: b.replication()["master_link_status"] == "down", 10, what="B sees its link down")
    assert a.replication()["slave_repl_offset"] > b.replication()["slave_repl_offset"]

    refused = agents["b"].run("promote")
    assert refused.returncode == OCF_ERR_GENERIC, refused.stderr
    assert "peer a is more current" in refused.stderr
    assert b.replication()["role"] == "slave" and a.replication()["role"] == "slave"
    assert agents["b"].run("monitor").returncode == OCF_SUCCESS

    promoted = agents["a"].run("promote")
    assert promoted.returncode == OCF_SUCCESS, promoted.stderr
    assert a.replication()["role"] == "master"
    assert agents["a"].run("monitor").returncode == OCF_RUNNING_PROMOTED
    assert {a.client().get(f"acked-{i}") for i in range(20)} == {str(i) for i in range(20)}
    assert agents["a"].run("promote").returncode == OCF_SUCCESS         # promoting a master changes nothing


def test_a_demoted_master_is_a_replica_that_takes_no_write(bus) -> None:
    m, master, a, b, agents = bus
    master.kill()
    master.wait(timeout=5)
    assert agents["a"].run("promote").returncode == OCF_SUCCESS
    a.client().set("before-demote", "1")
    demoted = agents["a"].run("demote")
    assert demoted.returncode == OCF_SUCCESS, demoted.stderr
    info = a.replication()
    assert info["role"] == "slave" and info["master_port"] == m.port
    with pytest.raises(redis.exceptions.ReadOnlyError):
        a.client().set("after-demote", "1")
    assert agents["a"].run("monitor").returncode == OCF_SUCCESS
    assert agents["a"].run("demote").returncode == OCF_SUCCESS          # demoting a replica changes nothing


def test_stop_ends_redis_and_monitor_then_reports_not_running(bus) -> None:
    _, _, a, _, agents = bus
    pid = agents["a"].pid
    assert agents["a"].run("stop").returncode == OCF_SUCCESS
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
             5, what="redis-server gone")
    assert agents["a"].run("monitor").returncode == OCF_NOT_RUNNING
    assert agents["a"].run("demote").returncode == OCF_SUCCESS          # not running: not promoted either
    assert agents["a"].run("promote").returncode == OCF_ERR_GENERIC


def test_after_a_promotion_replicas_follow_the_new_master_at_once_and_a_switchover_loses_nothing(bus) -> None:
    m, master, a, b, agents = bus
    master.kill()
    master.wait(timeout=5)
    assert agents["a"].run("promote").returncode == OCF_SUCCESS
    notify = {"OCF_RESKEY_CRM_meta_notify_type": "post", "OCF_RESKEY_CRM_meta_notify_operation": "promote",
              "OCF_RESKEY_CRM_meta_notify_promote_uname": "a "}
    agents["b"].env.update(notify)
    assert agents["b"].run("notify").returncode == OCF_SUCCESS
    wait_for(lambda: b.replication()["master_link_status"] == "up", 10, what="B following A")
    assert b.replication()["master_port"] == a.port
    writer = a.client()
    for i in range(50):
        writer.set(f"through-a-{i}", i)
    assert writer.execute_command("WAIT", 1, 2000) == 1
    # Switchover to B: A waits for B before it follows the bus address; B, left following a replica, goes
    # back to the bus address at its next monitor, and holds as much as A: its promotion goes through.
    assert agents["a"].run("demote").returncode == OCF_SUCCESS
    assert agents["b"].run("monitor").returncode == OCF_SUCCESS
    assert b.replication()["master_port"] == m.port
    assert b.replication()["slave_repl_offset"] == a.replication()["slave_repl_offset"]
    promoted = agents["b"].run("promote")
    assert promoted.returncode == OCF_SUCCESS, promoted.stderr
    assert [i for i in range(50) if b.client().get(f"through-a-{i}") != str(i)] == []


def test_a_replica_whose_master_stopped_answering_scores_by_its_offset_not_as_in_sync(bus) -> None:
    # Redis keeps a lost master's link "up" until repl-timeout, longer than the cluster takes to choose whom to
    # promote: a score of "in sync" then let it choose a less current replica, whose promote refused
    m, master, a, b, agents = bus
    answering = agents["b"].run("monitor")
    assert answering.returncode == OCF_SUCCESS and "no master answers" not in answering.stderr
    os.kill(master.pid, signal.SIGSTOP)
    try:
        assert b.replication()["master_link_status"] == "up"
        frozen = agents["b"].run("monitor")
        assert frozen.returncode == OCF_SUCCESS, frozen.stderr
        assert f"no master answers at 127.0.0.1:{m.port}; promotion score 200 (0 peer(s) ahead)" in frozen.stderr
    finally:
        os.kill(master.pid, signal.SIGCONT)


def test_after_a_refused_promotion_no_replica_follows_the_refusing_one_nor_itself(bus) -> None:
    m, master, a, b, agents = bus
    master.kill()
    master.wait(timeout=5)
    notify = {"OCF_RESKEY_CRM_meta_notify_type": "post", "OCF_RESKEY_CRM_meta_notify_operation": "promote",
              "OCF_RESKEY_CRM_meta_notify_promote_uname": "b "}
    for name in ("a", "b"):      # b's promote refused: b is still a replica, and nobody is master
        agents[name].env.update({**notify, "OCF_RESKEY_CRM_meta_on_node": name})
        assert agents[name].run("notify").returncode == OCF_SUCCESS
    assert a.replication()["master_port"] == m.port
    assert b.replication()["master_port"] == m.port


def test_a_frozen_redis_fails_its_monitor_within_the_monitor_timeout_and_stop_ends_it(bus) -> None:
    """bus-pause: a SIGSTOPped redis-server still has its pid, but its monitor fails within the timeouts the
    CIB gives (5 s promoted, 10 s unpromoted), and stop ends it well within its 30 s, so that with fencing on
    no failed stop fences the host."""
    m, master, a, b, agents = bus
    master.kill()
    master.wait(timeout=5)
    assert agents["a"].run("promote").returncode == OCF_SUCCESS
    for name, limit in (("a", 5.0), ("b", 10.0)):
        pid = agents[name].pid
        os.kill(pid, signal.SIGSTOP)
        begun = time.monotonic()
        failed = agents[name].run("monitor")
        assert failed.returncode == OCF_ERR_GENERIC, failed.stderr
        assert time.monotonic() - begun < limit - 1, f"{name}'s monitor must end within its timeout"
        assert "does not answer INFO" in failed.stderr
        begun = time.monotonic()
        assert agents[name].run("stop").returncode == OCF_SUCCESS
        assert time.monotonic() - begun < 10
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z",
                 2, what=f"{name}'s redis-server gone")
        assert agents[name].run("monitor").returncode == OCF_NOT_RUNNING


def test_a_frozen_master_is_killed_by_its_demote_at_once_and_the_next_promotion_keeps_every_acknowledged_write(
        bus) -> None:
    """bus-pause, fast: a master that does not answer PING within a second is SIGKILLed by its demote (not
    failed after the monitor's INFO timeout, then stopped gracefully): its stop is then immediate, and a replica
    that acknowledged every write is promoted with all of them."""
    m, master, a, b, agents = bus
    master.kill()
    master.wait(timeout=5)
    assert agents["a"].run("promote").returncode == OCF_SUCCESS
    agents["b"].env.update({"OCF_RESKEY_CRM_meta_notify_type": "post", "OCF_RESKEY_CRM_meta_notify_operation":
                            "promote", "OCF_RESKEY_CRM_meta_notify_promote_uname": "a"})
    assert agents["b"].run("notify").returncode == OCF_SUCCESS
    wait_for(lambda: b.replication()["master_link_status"] == "up", 10, what="B following A")
    writer = a.client()
    for i in range(20):
        writer.set(f"acked-{i}", i)
        assert writer.execute_command("WAIT", 1, 2000) == 1
    pid = agents["a"].pid
    os.kill(pid, signal.SIGSTOP)
    begun = time.monotonic()
    demoted = agents["a"].run("demote")
    assert demoted.returncode == OCF_SUCCESS, demoted.stderr
    assert time.monotonic() - begun < 2.5, "a frozen master's demote ends it within about a second"
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z",
             2, what="a's redis-server gone")
    assert agents["a"].run("monitor").returncode == OCF_NOT_RUNNING
    begun = time.monotonic()
    assert agents["a"].run("stop").returncode == OCF_SUCCESS
    assert time.monotonic() - begun < 1.0
    promoted = agents["b"].run("promote")
    assert promoted.returncode == OCF_SUCCESS, promoted.stderr
    assert [i for i in range(20) if b.client().get(f"acked-{i}") != str(i)] == []


def test_a_frozen_replica_is_killed_by_its_stop_within_a_second_or_two(bus) -> None:
    _, _, a, _, agents = bus
    pid = agents["a"].pid
    os.kill(pid, signal.SIGSTOP)
    begun = time.monotonic()
    assert agents["a"].run("stop").returncode == OCF_SUCCESS
    assert time.monotonic() - begun < 2.5
    assert agents["a"].run("monitor").returncode == OCF_NOT_RUNNING


def _garble_the_increment(aof: Path) -> Path:
    """A partial command in the middle of the last increment: what a write cut short by a full disk leaves."""
    increment = max(aof.glob("*.incr.aof"), key=lambda p: p.stat().st_size)
    data = increment.read_bytes()
    increment.write_bytes(data[:len(data) // 2] + b"*3\r\n$3\r\nSET\r\n$2\r\nzz" + data[len(data) // 2:])
    return increment


def _garble_the_manifest(aof: Path) -> Path:
    manifest = aof / "appendonly.aof.manifest"
    manifest.write_bytes(manifest.read_bytes() + b"not a manifest line\n")
    return manifest


def _aof_settled(instance: Instance) -> bool:
    info = instance.client().info("persistence")
    return info["aof_enabled"] == 1 and info["aof_rewrite_in_progress"] == 0 and info["aof_rewrite_scheduled"] == 0


@pytest.mark.parametrize("garble,repaired", [(_garble_the_increment, True), (_garble_the_manifest, False)])
def test_a_replica_whose_aof_cannot_load_starts_keeping_it_aside_and_resyncs_from_the_master(
        bus, garble, repaired) -> None:
    """A node whose AOF was garbled (bus-node-fail after disk-full) still starts its bus instance: from what
    redis-check-aof --fix makes of the AOF, else empty, with the original kept; either way it resyncs."""
    m, master, a, b, agents = bus
    # A replica rewrites its AOF after its full sync: writes taken before that ends go into the new base file,
    # and a garble in an empty increment is a truncated tail, which Redis loads (aof-load-truncated).
    wait_for(lambda: _aof_settled(a), 15, what="A's AOF rewrite after its sync done")
    writer = m.client()
    for i in range(20):
        writer.set(f"before-{i}", i)
    assert writer.execute_command("WAIT", 2, 2000) == 2
    wait_for(lambda: any(b"before-19" in p.read_bytes() for p in (a.dir / "appendonlydir").glob("*.incr.aof")), 5,
             what="A's increment holds the writes")
    assert agents["a"].run("stop").returncode == OCF_SUCCESS
    garbled = garble(a.dir / "appendonlydir")
    original = garbled.read_bytes()
    writer.set("while-a-was-down", "1")

    started = agents["a"].run("start")
    assert started.returncode == OCF_SUCCESS, started.stderr
    [kept] = a.dir.glob("appendonlydir.corrupt-*")
    assert (kept / garbled.name).read_bytes() == original
    assert (a.dir / "appendonlydir").is_dir()
    log = (a.dir / "redis.log").read_text()
    assert (f"the original is kept as {kept}" in log, f"moved aside to {kept}" in log) == (repaired, not repaired)
    wait_for(lambda: a.replication()["master_link_status"] == "up", 15, what="A back in sync")
    reader = a.client()
    assert [i for i in range(20) if reader.get(f"before-{i}") != str(i)] == []
    assert reader.get("while-a-was-down") == "1"
    assert agents["a"].run("monitor").returncode == OCF_SUCCESS
