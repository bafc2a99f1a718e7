"""The DSD node: the http driver, executed ids that survive a restart, and fencing of a stale (paused) DSD."""

from __future__ import annotations

import json
import signal
import time

import pytest

from conftest import free_port
from fixtures_redis import JsonSource, Sink, wait_for


@pytest.fixture
def source():
    s = JsonSource({"data": {"servers": [{"id": "a", "status": "ACTIVE", "ram": 512},
                                         {"id": "b", "status": "ERROR", "ram": 1024}]}})
    yield s
    s.close()


def rows(node, path):
    status, body = node.get(path, timeout=2)
    return status == 200 and {tuple(r["data"]) for r in body["results"]}


def test_http_driver_polls_maps_fields_and_posts_actions(node_cluster, source, sink):
    node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1")
    status, ds = a.request("POST", "/v1/data-sources", {
        "name": "nova", "driver": "http",
        "config": {"url": source.url, "poll_interval": 0.2, "action_url": sink.url,
                   "tables": {"servers": {"columns": ["id", "status"], "path": "data.servers"}}}})
    assert status == 201, ds
    assert a.request("POST", "/v1/policies", {"name": "p"})[0] == 201
    assert a.request("POST", "/v1/policies/p/rules",
                     {"rule": 'execute[nova:reboot(x)] :- nova:servers(id=x, status="ERROR")'})[0] == 201
    wait_for(lambda: rows(a, "/v1/data-sources/nova/tables/servers/rows") == {("a", "ACTIVE"), ("b", "ERROR")},
             10, what="polled rows")
    source.document = {"data": {"servers": [{"id": "a", "status": "ERROR"}, {"id": "c", "status": "ACTIVE"}]}}
    wait_for(lambda: rows(a, "/v1/data-sources/nova/tables/servers/rows") == {("a", "ERROR"), ("c", "ACTIVE")},
             10, what="changed rows")
    # b was in ERROR from the start, a went into ERROR later: one reboot each
    wait_for(lambda: sorted(sink.args()) == [("a",), ("b",)], 10, what="reboot(a) and reboot(b) at the sink")
    body = sink.received[0]
    assert body["datasource"] == "nova" and body["action"] == "reboot" and len(body["action_id"]) == 32
    st = a.get("/v1/data-sources/nova/status")[1]
    assert st["initialized"] and st["number_of_updates"] >= 2 and st["last_error"] is None
    # removed through the API -> the DSD stops polling
    assert a.request("DELETE", "/v1/data-sources/nova")[0] == 200
    time.sleep(0.5)
    gets = source.gets
    time.sleep(1.0)
    assert source.gets == gets


def publish_direct(cluster, action_id):
    """An action request as the API's ?action=execute sends it (runs on any DSD leader state)."""
    message = {"pe": "tester", "inc": "1",
               "reqs": [{"id": action_id, "ds": "feed", "action": "ping", "args": [1], "direct": True}]}
    cluster.redis.client().publish("congress:t:act", json.dumps(message))


def test_executed_ids_survive_a_dsd_restart(node_cluster, sink):
    dsd = node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1")
    assert a.request("POST", "/v1/data-sources", {"name": "feed", "driver": "push", "config": {
        "tables": {"items": ["id"]}, "action_url": sink.url}})[0] == 201
    wait_for(lambda: a.get("/v1/status")[1]["tables"][0]["dsd_seq"], 10, what="feed running on the DSD")
    publish_direct(node_cluster, "once-1")
    wait_for(lambda: sink.ids() == ["once-1"], 10, what="first execution")
    dsd.stop()
    dsd.start()
    wait_for(lambda: (s := a.get("/v1/status")[1]["dsd"]) and s["incarnation"] and s["epoch"] == 2, 10,
             what="restarted DSD heartbeats")
    wait_for(lambda: a.get("/v1/status")[1]["tables"][0]["epoch"] == 2, 10, what="feed republished")
    publish_direct(node_cluster, "once-1")
    publish_direct(node_cluster, "once-2")
    wait_for(lambda: "once-2" in sink.ids(), 10, what="second action")
    time.sleep(0.3)
    assert sorted(sink.ids()) == ["once-1", "once-2"]
    # the API's execute endpoint goes the same way
    status, body = a.request("POST", "/v1/data-sources/feed?action=execute",
                             {"name": "ping", "args": {"positional": [7]}})
    assert status == 200
    wait_for(lambda: body["action_id"] in sink.ids(), 10, what="API-triggered action")


@pytest.mark.slow
def test_paused_dsd_replaced_by_a_new_one_stops_itself(node_cluster, sink):
    old = node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1")
    assert a.request("POST", "/v1/data-sources", {"name": "feed", "driver": "push", "config": {
        "tables": {"items": ["id"]}, "action_url": sink.url}})[0] == 201
    wait_for(lambda: a.get("/v1/status")[1]["tables"][0]["epoch"] == 1, 10, what="epoch 1")
    old.signal(signal.SIGSTOP)
    new = node_cluster.add("dsd", "d2")
    wait_for(lambda: a.get("/v1/status")[1]["tables"][0]["epoch"] == 2, 10, what="epoch 2 from the new DSD")
    old.signal(signal.SIGCONT)
    old.proc.wait(timeout=15)
    assert old.proc.returncode == 1
    assert "superseded" in old.log_text()
    assert new.alive()
    assert a.request("PUT", "/v1/data-sources/feed/tables/items/rows", [[1], [2]])[0] == 200
    wait_for(lambda: rows(a, "/v1/data-sources/feed/tables/items/rows") == {(1,), (2,)}, 10, what="new DSD serving")


@pytest.mark.slow
def test_a_resumed_paused_dsd_executes_nothing_the_newer_epoch_took(node_cluster, sink):
    """dsd-pause: while the old DSD is frozen a new one takes epoch 2, and an action request reaches both (the
    old one's socket holds it). The new one runs it; the old one, resumed, reads it, is refused its claim by
    the epoch fence, and stops without a POST."""
    old = node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1")
    assert a.request("POST", "/v1/data-sources", {"name": "feed", "driver": "push", "config": {
        "tables": {"items": ["id"]}, "action_url": sink.url}})[0] == 201
    wait_for(lambda: a.get("/v1/status")[1]["tables"][0]["epoch"] == 1, 10, what="epoch 1")
    publish_direct(node_cluster, "before-pause")
    wait_for(lambda: sink.ids() == ["before-pause"], 10, what="the old DSD running an action")
    old.signal(signal.SIGSTOP)
    new = node_cluster.add("dsd", "d2")
    wait_for(lambda: a.get("/v1/status")[1]["tables"][0]["epoch"] == 2, 10, what="epoch 2 from the new DSD")
    for i in range(5):
        publish_direct(node_cluster, f"during-pause-{i}")
    wait_for(lambda: len(sink.ids()) == 6, 10, what="the new DSD running them")
    old.signal(signal.SIGCONT)
    old.proc.wait(timeout=15)
    assert old.proc.returncode == 1 and "superseded" in old.log_text()
    time.sleep(0.5)
    assert sorted(sink.ids()) == sorted(["before-pause", *(f"during-pause-{i}" for i in range(5))])
    executors = {b["action_id"]: b["executor"] for b in sink.received}
    assert executors["before-pause"].startswith("d1/")
    assert all(executors[f"during-pause-{i}"].startswith("d2/") for i in range(5)), executors
    assert new.alive()


def test_action_requested_while_no_dsd_runs_is_executed_once_by_the_next(node_cluster, sink):
    dsd = node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1")
    b = node_cluster.add("api-pe", "n2")
    assert a.request("POST", "/v1/data-sources", {"name": "feed", "driver": "push", "config": {
        "tables": {"items": ["id"]}, "action_url": sink.url}})[0] == 201
    assert a.request("PUT", "/v1/data-sources/feed/tables/items/rows", [[1]])[0] == 200
    wait_for(lambda: rows(b, "/v1/data-sources/feed/tables/items/rows") == {(1,)}, 10, what="row 1 on n2")
    assert a.request("POST", "/v1/policies", {"name": "p"})[0] == 201
    assert a.request("POST", "/v1/policies/p/rules", {"rule": "execute[feed:hello(x)] :- feed:items(id=x)"})[0] == 201
    wait_for(lambda: sink.args() == [(1,)], 10, what="hello(1)")
    dsd.signal(signal.SIGKILL)
    dsd.proc.wait(5)
    # a rule added while no DSD runs: both PEs request hello2(1); nobody hears it
    assert b.request("POST", "/v1/policies/p/rules", {"rule": "execute[feed:hello2(x)] :- feed:items(id=x)"})[0] == 201
    time.sleep(0.3)
    bus = node_cluster.redis.client().pubsub()
    bus.subscribe("congress:t:act")
    dsd.start()
    wait_for(lambda: ("hello2", 1) in {(r["action"], r["args"][0]) for r in sink.received}, 10,
             what="hello2(1) executed by the new DSD")
    time.sleep(1.5)
    assert sorted((r["action"], tuple(r["args"])) for r in sink.received) == [("hello", (1,)), ("hello2", (1,))]
    assert a.get("/v1/status")[1]["actions"]["resent"] >= 1
    # resent requests run whoever the new DSD's leader is: a leader that has nothing to resend cannot hold
    # back the other PE's. (The originals went out too, once a subscriber heard them: a PE keeps requests no one
    # hears, and this test's own subscriber counts.)
    resent = []
    while (msg := bus.get_message(timeout=0.2)) is not None:
        if msg["type"] == "message":
            resent += json.loads(msg["data"])["reqs"]
    bus.close()
    assert resent and all(r.get("direct") for r in resent if "direct" in r), resent
    assert any(r.get("direct") for r in resent), resent


def test_push_notice_older_than_the_table_is_skipped(node_cluster):
    """Pushed rows travel in the notice with their version; a stale notice (as a full sync racing the notices
    would see) must not move the table back, and a notice without rows (an older API node) is read from the
    store."""
    node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1")
    assert a.request("POST", "/v1/data-sources", {"name": "feed", "driver": "push",
                                                  "config": {"tables": {"items": ["id"]}}})[0] == 201
    ds_id = a.get("/v1/data-sources/feed")[1]["id"]
    path = "/v1/data-sources/feed/tables/items/rows"
    for rows_now in ([[1]], [[2], [3]]):
        assert a.request("PUT", path, rows_now)[0] == 200
    wait_for(lambda: rows(a, path) == {(2,), (3,)}, 5, what="second push on the PE")
    seq = a.get("/v1/status")[1]["tables"][0]["seq"]
    bus = node_cluster.redis.client()
    bus.publish("congress:t:push", json.dumps({"ds_id": ds_id, "table": "items", "v": 1, "rows": [[1]]}))
    bus.publish("congress:t:push", json.dumps({"ds_id": ds_id, "table": "items", "v": 2, "rows": [[9]]}))
    time.sleep(0.5)
    assert rows(a, path) == {(2,), (3,)}
    assert a.get("/v1/status")[1]["tables"][0]["seq"] == seq
    bus.set(f"congress:t:pushed:{ds_id}:items", json.dumps([[4]]))
    bus.incr(f"congress:t:pushver:{ds_id}:items")
    bus.publish("congress:t:push", json.dumps({"ds_id": ds_id, "table": "items"}))
    wait_for(lambda: rows(a, path) == {(4,)}, 5, what="rows read from the store for a notice without them")
    bus.set(f"congress:t:pushed:{ds_id}:items", json.dumps([[5]]))   # as an older API node pushes: no version
    bus.publish("congress:t:push", json.dumps({"ds_id": ds_id, "table": "items"}))
    wait_for(lambda: rows(a, path) == {(5,)}, 5, what="rows an older API node pushed, without a version")


def test_an_action_whose_post_got_no_answer_runs_on_the_next_dsd(node_cluster):
    """The DSD claims an action before its POST. When no answer came (here: nothing listens yet; in a
    failover: the DSD's host was cut off mid-POST), the next DSD process must run it when the PE sends its
    recent requests again, and only that one time."""
    port = free_port()
    dsd = node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1")
    assert a.request("POST", "/v1/data-sources", {"name": "feed", "driver": "push", "config": {
        "tables": {"items": ["id"]}, "action_url": f"http://127.0.0.1:{port}/actions"}})[0] == 201
    assert a.request("POST", "/v1/policies", {"name": "p"})[0] == 201
    assert a.request("POST", "/v1/policies/p/rules", {"rule": "execute[feed:notify(x)] :- feed:items(id=x)"})[0] == 201
    wait_for(lambda: a.get("/v1/status")[1]["tables"][0]["dsd_seq"], 10, what="feed running on the DSD")
    assert a.request("PUT", "/v1/data-sources/feed/tables/items/rows", [[7]])[0] == 200
    wait_for(lambda: a.get("/v1/status")[1]["dsd"]["counts"]["failed"] == 1, 10, what="the POST to fail")
    sink = Sink("127.0.0.1", port)
    try:
        dsd.stop()
        dsd.start()
        wait_for(lambda: sink.args() == [(7,)], 10, what="the action run by the new DSD")
        executor = sink.received[0]["executor"]
        time.sleep(1.0)
        assert sink.args() == [(7,)]
        counts = a.get("/v1/status")[1]["dsd"]["counts"]
        assert counts["executed"] == 1 and counts["failed"] == 0, counts
        assert executor.startswith("d1/") and a.get("/v1/status")[1]["dsd"]["incarnation"] in executor
    finally:
        sink.close()
