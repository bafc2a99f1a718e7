"""Three bus nodes on the shared lab: kill -9 the promoted Redis and a replica on another host takes over within
seconds, with every write a replica acknowledged (WAIT 1) before the kill. The lab is given back deployed with
its own inventory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
import yaml

from congressctl import deploy, verify
from congressctl.inventory import load_inventory
from congressctl.lab import VIP_OCTET, lab_exec
from fixtures_cluster import congressctl

pytestmark = [pytest.mark.lab, pytest.mark.slow]

KEYS = 300
TAKEOVER_LIMIT_S = 10.0


def _three_bus_inventory(cluster, folder: Path) -> Path:
    """The lab's inventory with the bus role on n1..n3 and a bus VIP next to the API VIP."""
    data = yaml.safe_load(cluster.inventory_path.read_text())
    for node in data["nodes"]:
        if "bus" not in node["roles"]:
            node["roles"].append("bus")
    data["bus"]["vip"] = f"{cluster.lab.vip.rsplit('.', 1)[0]}.{VIP_OCTET + 1}"
    for key in ("key", "known_hosts"):
        data["ssh"][key] = str((cluster.inventory_path.parent / data["ssh"][key]).resolve())
    data["state_dir"] = str(cluster.inv.state_dir)
    path = folder / "inventory.yaml"      # the lab's file name: rendered headers stay the same
    path.write_text(yaml.safe_dump(data))
    return path


def _placement(cluster) -> verify.Placement:
    out = lab_exec(cluster.lab, "n1", ["crm_mon", "-1", "--output-as=xml"], timeout=30).stdout.decode()
    return verify.parse_crm_mon(out)


def _bus(address: str, password: str, timeout: float = 2.0) -> redis.Redis:
    return redis.Redis(host=address, port=6379, password=password, socket_timeout=timeout,
                       socket_connect_timeout=timeout / 2, decode_responses=True)


def _acknowledged_write(client: redis.Redis, key: str, value: str) -> bool:
    client.set(key, value)
    return client.execute_command("WAIT", 1, 1000) >= 1


def _wait_healthy(cluster, inv, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    problems = ["not checked"]
    while time.monotonic() < deadline:
        placement = _placement(cluster)
        problems = verify.placement_problems(inv, placement)
        if not problems and len(placement.on("bus")) == len(inv.with_role("bus")):
            return
        time.sleep(1)
    raise AssertionError(f"cluster not healthy after {limit_s}s: {problems}")


def test_killed_promoted_redis_is_replaced_by_a_replica_elsewhere_with_every_acknowledged_write(cluster, tmp_path):
    path = _three_bus_inventory(cluster, tmp_path)
    inv = load_inventory(path)
    password = deploy.load_or_create_secrets(cluster.inv, create=False).bus_password
    try:
        proc = congressctl("deploy", "-i", str(path), "--output", "json", timeout=900)
        assert proc.returncode == 0, f"3-bus deploy failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        _wait_healthy(cluster, inv)
        killed = _placement(cluster).promoted["bus"][0]
        writer = _bus(inv.bus.vip, password)
        for i in range(KEYS):
            assert _acknowledged_write(writer, f"acked-{i}", str(i)), f"acked-{i} reached no replica"
        pid = lab_exec(cluster.lab, killed, ["pgrep", "-x", "redis-server"]).stdout.decode().split()[0]

        start = time.monotonic()
        assert lab_exec(cluster.lab, killed, ["kill", "-9", pid]).returncode == 0
        promoted_s = writable_s = None
        while time.monotonic() - start < 60 and (promoted_s is None or writable_s is None):
            if promoted_s is None:
                placement = _placement(cluster)
                now = placement.promoted.get("bus", [])
                if now and now != [killed] and placement.on("bus-vip") == now:
                    promoted_s, new = time.monotonic() - start, now[0]
            if writable_s is None:
                try:
                    if _acknowledged_write(_bus(inv.bus.vip, password, timeout=1.0), "after-kill", "1"):
                        writable_s = time.monotonic() - start
                except redis.RedisError:
                    pass
            time.sleep(0.1)
        print(f"\nkill -9 of the promoted Redis on {killed}: {new if promoted_s else 'nothing'} promoted "
              f"after {promoted_s and round(promoted_s, 2)} s (crm_mon), bus writable with WAIT 1 after "
              f"{writable_s and round(writable_s, 2)} s")
        assert promoted_s is not None and new != killed, "no replica on another host was promoted"
        assert writable_s is not None and writable_s < TAKEOVER_LIMIT_S, f"bus writable only after {writable_s}s"
        assert promoted_s < TAKEOVER_LIMIT_S
        reader = _bus(inv.bus.vip, password)
        assert [i for i in range(KEYS) if reader.get(f"acked-{i}") != str(i)] == []
        assert reader.info("replication")["role"] == "master"
    finally:
        lab_exec(cluster.lab, "n1", ["crm_resource", "--cleanup", "--resource", "bus-clone"], timeout=60)
        back = congressctl("deploy", "-i", str(cluster.inventory_path), "--output", "json", timeout=900)
        assert back.returncode == 0, f"redeploying the lab's inventory failed:\n{back.stderr[-3000:]}"
        _wait_healthy(cluster, cluster.inv)
