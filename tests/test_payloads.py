"""The payloads nodes exchange (congressctl/payloads.py): exact round trips of real answers and heartbeats, and
what a reader makes of an older node's answer that lacks keys."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from congressctl import status
from congressctl.bus import Channels
from congressctl.node.dsd import write_liveness
from congressctl.payloads import (ApiPeStatus, BusView, DatasourceStatus, DriverStatus, DsdCounts, DsdHeartbeat,
                                  DsdLiveness, DsdView, Leader, PeerView, PeHeartbeat, TableView)
from fixtures_redis import wait_for

DATA = Path(__file__).resolve().parent / "data" / "status"
TOKEN = "feedfacecafebeef"  # the token the captures in tests/data/status were made with


def _captured_answers() -> list[dict]:
    """The /v1/status answers of real api-pe nodes, as `congressctl status` captured them from a lab."""
    answers = []
    for path in sorted(DATA.glob("probes_*/n*.out")):
        api = status.parse_probes(path.read_text(), TOKEN).get("api")
        if api is not None and api.rc == 0:
            answers.append(json.loads(api.out))
    return answers


# ---------------------------------------------------------------------------------------------- round trips


def test_captured_status_answers_round_trip_to_the_same_json() -> None:
    answers = _captured_answers()
    assert len(answers) == 5
    for answer in answers:
        parsed = ApiPeStatus.from_dict(answer)
        assert json.dumps(parsed.to_dict()) == json.dumps(answer)   # same keys, values and order
        assert parsed.dsd is not None and parsed.dsd.leader is not None and parsed.tables
        assert parsed.node == answer["node"] and parsed.bus.connected is answer["bus"]["connected"]
        assert parsed.dsd.leader.node == answer["dsd"]["leader"]["node"]
        assert parsed.dsd.counts.executed == answer["dsd"]["counts"]["executed"]
        assert [p.node for p in parsed.peers] == [p["node"] for p in answer["peers"]]
        assert parsed.table(answer["tables"][0]["table"]).lag == answer["tables"][0]["lag"]


def test_a_built_status_round_trips() -> None:
    built = ApiPeStatus(
        node="n1", incarnation="i1", synced=True, healthy=True,
        bus=BusView(host="10.0.0.1", port=6379, connected=True, connects=2, last_error=None),
        peers=[PeerView(node="d1", role="dsd", incarnation="i9", age_ms=12.5, alive=True)],
        dsd=DsdView(node="d1", incarnation="i9", epoch=3, leader=Leader(node="n1", inc="i1"), leader_since=1.5,
                    counts=DsdCounts(executed=4, failed=1), buffered=2, age_ms=12.5),
        tables=[TableView(table="ds:t", datasource_id="x", epoch=3, seq=7, dsd_epoch=3, dsd_seq=7, lag=0)])
    wire = json.loads(json.dumps(built.to_dict()))
    assert ApiPeStatus.from_dict(wire) == built
    assert wire["dsd"]["leader"] == {"node": "n1", "inc": "i1"}
    assert wire["actions"] == {"sent": 0, "queued": 0, "dropped": 0, "resent": 0}


def test_heartbeats_keep_the_wire_shape_and_round_trip() -> None:
    pe = PeHeartbeat(node="n1", inc="i1", ts=1700000000.25, synced=True, actions_sent=3, tables={"x/t": [2, 5]},
                     breaks=2)
    assert pe.to_dict() == {"node": "n1", "role": "api-pe", "inc": "i1", "ts": 1700000000.25, "synced": True,
                            "actions_sent": 3, "tables": {"x/t": [2, 5]}, "breaks": 2}
    assert PeHeartbeat.from_dict(json.loads(json.dumps(pe.to_dict()))) == pe
    dsd = DsdHeartbeat(node="d1", inc="i9", ts=1700000000.5, epoch=2, tables={"x/t": [2, 5]},
                       leader=Leader(node="n1", inc="i1"), leader_since=1699999999.0,
                       counts=DsdCounts(executed=5, leader_changes=1), buffered=1,
                       datasources={"x": DatasourceStatus(name="nova", status=DriverStatus(initialized=True))})
    wire = dsd.to_dict()
    assert list(wire) == ["node", "role", "inc", "ts", "epoch", "tables", "leader", "leader_since", "counts",
                          "buffered", "datasources"]
    assert wire["role"] == "dsd" and wire["leader"] == {"node": "n1", "inc": "i1"}
    assert wire["counts"] == {"executed": 5, "replayed": 0, "ignored": 0, "expired": 0, "failed": 0,
                              "leader_changes": 1}
    assert wire["datasources"]["x"] == {"name": "nova", "initialized": True, "last_updated": None,
                                        "number_of_updates": 0, "last_error": None, "actions_executed": 0,
                                        "actions_failed": 0}
    assert DsdHeartbeat.from_dict(json.loads(json.dumps(wire))) == dsd


# ---------------------------------------------------------------------------------------------- older nodes


def test_missing_optional_keys_take_their_defaults_and_unknown_keys_are_ignored() -> None:
    bare = ApiPeStatus.from_dict({"node": "n1", "something_newer": {"x": 1}})
    assert (bare.node, bare.role, bare.synced, bare.healthy, bare.dsd, bare.peers, bare.tables) == (
        "n1", "api-pe", False, False, None, [], [])
    assert bare.bus == BusView() and not bare.bus.connected
    partial = ApiPeStatus.from_dict({"node": "n1", "bus": {"connected": True},
                                     "peers": [{"node": "d1", "role": "dsd"}],
                                     "dsd": {"node": "d1", "leader": None},
                                     "tables": [{"table": "ds:t", "lag": 2}]})
    assert partial.bus.connected and partial.bus.last_error is None
    assert partial.peers[0].age_ms is None and partial.peers[0].alive is False
    assert partial.dsd.leader is None and partial.dsd.counts == DsdCounts() and partial.dsd.buffered == 0
    assert partial.tables[0].dsd_epoch is None and partial.tables[0].lag == 2
    # an api-pe older than the heartbeat's tables and counters, and a DSD that has no epoch yet
    pe = PeHeartbeat.from_dict({"node": "n1", "role": "api-pe", "inc": "i1", "ts": 1.0, "synced": True})
    assert pe.tables == {} and pe.actions_sent == 0 and pe.synced
    dsd = DsdHeartbeat.from_dict({"node": "d1", "role": "dsd", "inc": "i9", "epoch": None})
    assert dsd.epoch is None and dsd.leader is None and dsd.tables == {} and dsd.datasources == {}
    assert DatasourceStatus.from_dict({"name": "nova"}).status == DriverStatus()


def test_what_cannot_be_read_is_refused_with_a_named_error() -> None:
    with pytest.raises(TypeError):
        ApiPeStatus.from_dict({"synced": True})                      # no node
    with pytest.raises(TypeError):
        PeHeartbeat.from_dict({"node": "n1", "role": "api-pe"})      # no incarnation
    with pytest.raises(TypeError, match="expected a JSON object"):
        ApiPeStatus.from_dict({"node": "n1", "dsd": ["d1"]})
    with pytest.raises(TypeError, match="expected a JSON list"):
        ApiPeStatus.from_dict({"node": "n1", "peers": {"d1": {}}})
    with pytest.raises(TypeError, match="expected a JSON object"):
        DsdHeartbeat.from_dict({"node": "d1", "inc": "i", "datasources": {"x": "nova"}})


# ---------------------------------------------------------------------------------------------- real nodes


def _heartbeats(cluster, roles: set[str], timeout: float = 10.0) -> dict[str, dict]:
    """The first heartbeat of each role heard on the cluster's real bus."""
    pubsub = cluster.redis.client().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(Channels(cluster.cluster).heartbeat)
    beats: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    try:
        while set(beats) < roles and time.monotonic() < deadline:
            msg = pubsub.get_message(timeout=0.5)
            if msg and msg["type"] == "message":
                data = json.loads(msg["data"])
                beats.setdefault(data["role"], data)
    finally:
        pubsub.close()
    return beats


def test_real_status_and_heartbeats_parse_and_round_trip(node_cluster, sink) -> None:
    node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1")
    assert a.request("POST", "/v1/data-sources", {"name": "nova", "driver": "push", "config": {
        "tables": {"vms": {"columns": ["id"]}}, "action_url": sink.url}})[0] == 201

    def complete():
        answer = a.get("/v1/status")[1]
        return answer["dsd"] and answer["dsd"]["leader"] and answer["tables"] and answer
    answer = wait_for(complete, 10, what="a status naming the DSD's leader and a table")
    parsed = ApiPeStatus.from_dict(answer)
    assert parsed.to_dict() == answer
    assert (parsed.node, parsed.synced, parsed.healthy, parsed.bus.connected) == ("n1", True, True, True)
    assert parsed.dsd.node == "d1" and parsed.dsd.leader.node == "n1"
    assert parsed.tables[0].table == "nova:vms" and parsed.table("nova:vms").datasource_id == answer[
        "tables"][0]["datasource_id"]
    assert {(p.node, p.role) for p in parsed.peers} == {("n1", "api-pe"), ("d1", "dsd")}

    beats = _heartbeats(node_cluster, {"api-pe", "dsd"})
    pe, dsd = PeHeartbeat.from_dict(beats["api-pe"]), DsdHeartbeat.from_dict(beats["dsd"])
    assert pe.to_dict() == beats["api-pe"] and dsd.to_dict() == beats["dsd"]
    assert (pe.node, pe.inc, pe.synced) == ("n1", parsed.incarnation, True)
    assert (dsd.node, dsd.inc, dsd.leader) == ("d1", parsed.dsd.incarnation, Leader("n1", parsed.incarnation))
    assert [d.name for d in dsd.datasources.values()] == ["nova"]


def test_the_dsd_liveness_file_is_one_json_line_its_shell_agent_can_read(tmp_path) -> None:
    record = DsdLiveness(node="d1", inc="i9", pid=4242, ts=1700000000.25, stale_after_s=3, epoch=7, bus_silent_s=0.2,
                         problem="control bus 10.0.0.5:6379 unreachable from this host for 11.0s: it's gone")
    path = tmp_path / "dsd.live"
    write_liveness(str(path), record)
    text = path.read_text()
    assert text.count("\n") == 1 and not (tmp_path / "dsd.live.tmp").exists()
    assert DsdLiveness.from_dict(json.loads(text)) == record
    for piece in ('"pid":4242', '"stale_after_s":3', '"epoch":7', '"problem":"control bus 10.0.0.5:6379'):
        assert piece in text
    assert DsdLiveness.from_dict({"node": "d1", "inc": "i", "pid": 1, "ts": 0, "stale_after_s": 2}).problem is None
