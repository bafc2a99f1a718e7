"""Acknowledged means replicated: with bus.sync_replicas, a write is acknowledged only once a replica has it.

Real redis-servers on loopback: a master and a replica of it. A replica frozen by SIGSTOP confirms nothing;
a master whose replica is gone refuses writes (min-replicas-to-write), so nothing is written.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import time

import httpx
import pytest
import redis.asyncio as aioredis

from conftest import free_port
from congressctl.bus import Channels
from congressctl.errors import NotReplicatedError
from congressctl.node.store import REPLICA_WAIT_MS, Store
from congressctl.status import HostProbe
from fixtures_redis import ADMIN_TOKEN, NodeCluster, RedisServer, http_json, wait_for

pytestmark = pytest.mark.slow


def _replica_of(master: RedisServer, tmp_path_factory) -> RedisServer:
    d = tmp_path_factory.mktemp("replica")
    replica = RedisServer(dir=d, port=free_port(), password=master.password,
                          extra_conf=[f"replicaof 127.0.0.1 {master.port}", f"masterauth {master.password}",
                                      "replica-read-only yes"])
    replica.start()
    wait_for(lambda: replica.client().info("replication").get("master_link_status") == "up", 15,
             what="replica linked to its master")
    # the link is up before the master has its first acknowledgement: until then it counts no good replica and
    # refuses writes under min-replicas-to-write (a loaded machine showed it)
    wait_for(lambda: master.client().info("replication").get("min_slaves_good_slaves", 1) >= 1, 15,
             what="the master counting the replica good")
    return replica


@pytest.fixture
def master(tmp_path_factory):
    d = tmp_path_factory.mktemp("master")
    server = RedisServer(dir=d, port=free_port(), password=secrets.token_hex(16),
                         extra_conf=["min-replicas-to-write 1", "min-replicas-max-lag 2"])
    server.password_file.write_text(server.password + "\n")
    server.password_file.chmod(0o600)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def replica(master, tmp_path_factory):
    server = _replica_of(master, tmp_path_factory)
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)
    server.stop()


def _store(server: RedisServer) -> tuple[aioredis.Redis, Store]:
    client = aioredis.Redis(host=server.host, port=server.port, password=server.password, decode_responses=True,
                            protocol=2)
    return client, Store(client, Channels("t"), origin="test", sync_replicas=1)


def _policy(name: str) -> dict:
    return {"id": f"id-{name}", "name": name, "kind": "nonrecursive", "description": ""}


def test_an_acknowledged_write_is_on_the_replica(master, replica) -> None:
    async def go() -> bool:
        client, store = _store(master)
        try:
            return await store.create_policy(_policy("p1"))
        finally:
            await client.aclose()
    assert asyncio.run(go())
    # read at once, no waiting: WAIT confirmed that the replica has it
    assert replica.client().hget("congress:t:policy-names", "p1") == "id-p1"


def test_a_write_no_replica_confirms_is_not_acknowledged(master, replica) -> None:
    replica.proc.send_signal(signal.SIGSTOP)

    async def go() -> tuple[float, str]:
        client, store = _store(master)
        started = time.monotonic()
        try:
            with pytest.raises(NotReplicatedError) as caught:
                await store.create_policy(_policy("p2"))
            return time.monotonic() - started, str(caught.value)
        finally:
            await client.aclose()
    took, message = asyncio.run(go())
    assert "not confirmed by 1 replica" in message
    assert took >= REPLICA_WAIT_MS / 1000 * 0.9


def test_a_master_without_replicas_refuses_and_writes_nothing(master, replica) -> None:
    replica.stop()
    wait_for(lambda: master.client().info("replication").get("min_slaves_good_slaves", 1) == 0, 20,
             what="the master counting no good replica")

    async def go() -> str:
        client, store = _store(master)
        try:
            with pytest.raises(NotReplicatedError) as caught:
                await store.create_policy(_policy("p3"))
            with pytest.raises(NotReplicatedError):
                await store.next_epoch()
            return str(caught.value)
        finally:
            await client.aclose()
    assert "nothing written" in asyncio.run(go())
    assert master.client().hget("congress:t:policy-names", "p3") is None
    assert master.client().get("congress:t:epoch") is None


def test_a_script_flushed_from_the_master_is_loaded_again(master, replica) -> None:
    async def go() -> bool:
        client, store = _store(master)
        try:
            assert await store.create_policy(_policy("p4a"))      # loads the script
            await client.script_flush()                          # as a new master after a failover may be
            return await store.create_policy(_policy("p4"))
        finally:
            await client.aclose()
    assert asyncio.run(go())
    assert replica.client().hget("congress:t:policy-names", "p4") == "id-p4"


def test_api_refuses_unconfirmed_writes_and_reads_from_its_copy_while_the_bus_is_away(
        master, replica, tmp_path) -> None:
    cluster = NodeCluster(redis=master, dir=tmp_path)
    try:
        node = cluster.add("api-pe", "a1", extra={"bus": {
            "host": "127.0.0.1", "port": master.port, "password_file": str(master.password_file), "tls": False,
            "sync_replicas": 1}})
        assert node.request("POST", "/v1/policies", {"name": "kept"})[0] == 201
        assert replica.client().hget("congress:t:policy-names", "kept")

        replica.proc.send_signal(signal.SIGSTOP)
        code, body = node.request("POST", "/v1/policies", {"name": "unconfirmed"})
        assert code == 503
        assert "not confirmed by 1 replica" in body["error"]["message"]
        replica.proc.send_signal(signal.SIGCONT)

        master.proc.send_signal(signal.SIGSTOP)      # the bus is away: reads answer from the node's copy
        try:
            wait_for(lambda: not http_json("GET", node.url + "/v1/status", timeout=2)[1]["bus"]["connected"], 15,
                     what="the node noticing its bus is gone")
            code, _, headers = _get_with_headers(node.url + "/v1/policies/kept")
            assert code == 200
            assert float(headers["X-Congress-Bus-Age"]) > 0
            assert node.get("/healthz")[0] == 200                 # within the grace: stays in HAProxy's pool
            assert node.request("POST", "/v1/policies", {"name": "while_away"}, timeout=10)[0] == 503
        finally:
            master.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: http_json("GET", node.url + "/v1/status", timeout=2)[1]["bus"]["connected"], 15,
                 what="the node back on its bus")
        assert node.alive()
        code, _, headers = _get_with_headers(node.url + "/v1/policies/kept")
        assert code == 200 and "X-Congress-Bus-Age" not in headers
    finally:
        cluster.stop_all()


def _get_with_headers(url: str) -> tuple[int, dict, httpx.Headers]:
    response = httpx.get(url, timeout=5, headers={"X-Auth-Token": ADMIN_TOKEN})
    return response.status_code, response.json(), response.headers


def test_a_stored_policy_the_engine_refuses_does_not_stop_a_resyncing_node(node_cluster) -> None:
    """A write answered 503 mid-way (its node could not take it back) may leave a policy in the store that the
    engine refuses: a node resyncing over it logs it and goes on serving."""
    node = node_cluster.add("api-pe", "a1")
    assert node.request("POST", "/v1/policies", {"name": "good"})[0] == 201
    r = node_cluster.redis.client()
    r.hset("congress:t:policy-names", "bad-name", "bad-id")
    r.hset("congress:t:policies", "bad-id", '{"id": "bad-id", "name": "bad-name", "kind": "nonrecursive"}')
    r.client_kill_filter(_type="pubsub")                   # the node resubscribes and resyncs from the store
    wait_for(lambda: "policy bad-name refused by the engine" in node.log_text(), 15, what="the resync")
    assert node.alive()
    assert node.get("/v1/policies/good")[0] == 200
    assert node.get("/healthz")[0] == 200


def _info_probe(server: RedisServer) -> HostProbe:
    proc = subprocess.run(["redis-cli", "--no-auth-warning", "-h", server.host, "-p", str(server.port), "INFO",
                           "replication"], capture_output=True, text=True, timeout=10,
                          env={**os.environ, "REDISCLI_AUTH": server.password})
    return HostProbe(rc=proc.returncode, out=proc.stdout, err=proc.stderr)


def test_status_reads_the_bus_from_real_info_replication(master, replica, inv_with_bus) -> None:
    from congressctl import status
    def read() -> tuple[list, object]:
        nodes = [status.read_bus_node("n1", _info_probe(master)), status.read_bus_node("n2", _info_probe(replica))]
        return nodes, status.bus_status(inv_with_bus, nodes)
    # a replica just linked is in sync once it has acknowledged an offset (REPLCONF ACK, once a second)
    nodes, bus = wait_for(lambda: (lambda got: got if got[1].in_sync == 1 else None)(read()), 10,
                          what="the replica's first acknowledged offset")
    assert bus.promoted == ["n1"] and bus.in_sync == 1 and bus.replicated
    assert nodes[1].role == "replica" and nodes[1].link == "up" and nodes[1].lag_bytes == 0
    assert status.bus_problems(bus) == []

    replica.stop()
    wait_for(lambda: master.client().info("replication").get("min_slaves_good_slaves", 1) == 0, 20,
             what="the master counting no good replica")
    stopped = status.read_bus_node("n2", _info_probe(replica))
    bus = status.bus_status(inv_with_bus, [status.read_bus_node("n1", _info_probe(master)), stopped])
    assert not bus.replicated and stopped.error
    problems = status.bus_problems(bus)
    assert any("bus writes are not replicated: 0 replica(s) in sync on n1" in p for p in problems)


@pytest.fixture
def inv_with_bus(tmp_path):
    import yaml
    from congressctl.inventory import generate, parse_inventory
    return parse_inventory(yaml.safe_dump(generate(3, bus=3)), tmp_path / "inv.yaml")
