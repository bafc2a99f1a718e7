"""Table publication: new epochs, lost diffs (a middle one and the last one), and a Redis restart."""

from __future__ import annotations

import signal
import time

import pytest

from fixtures_redis import wait_for


def make_feed(node, sink_url):
    assert node.request("POST", "/v1/data-sources", {
        "name": "feed", "driver": "push",
        "config": {"tables": {"items": {"columns": ["id", "name"]}}, "action_url": sink_url}})[0] == 201
    assert node.request("POST", "/v1/policies", {"name": "p"})[0] == 201
    assert node.request("POST", "/v1/policies/p/rules",
                        {"rule": "execute[feed:notify(x)] :- feed:items(id=x)"})[0] == 201
    assert node.request("POST", "/v1/policies/p/rules", {"rule": "seen(x, n) :- feed:items(x, n)"})[0] == 201


def push(node, rows):
    assert node.request("PUT", "/v1/data-sources/feed/tables/items/rows", [list(r) for r in rows])[0] == 200


def pe_rows(node, path="/v1/data-sources/feed/tables/items/rows"):
    status, body = node.get(path, timeout=2)
    return status == 200 and {tuple(r["data"]) for r in body["results"]}


def table_status(node):
    return node.get("/v1/status")[1]["tables"][0]


def converge(nodes, rows):
    for node in nodes:
        wait_for(lambda: pe_rows(node) == rows and pe_rows(node, "/v1/policies/p/tables/seen/rows") == rows,
                 10, what=f"{node.node_id} holds {sorted(rows)}")


@pytest.mark.slow
def test_dsd_restart_new_epoch_replaces_tables_with_exactly_the_new_rows(node_cluster, sink):
    dsd = node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1")
    b = node_cluster.add("api-pe", "n2")
    make_feed(a, sink.url)
    push(a, [(1, "a"), (2, "b"), (3, "c")])
    converge([a, b], {(1, "a"), (2, "b"), (3, "c")})
    wait_for(lambda: len(sink.ids()) == 3, 10, what="3 actions")
    # The sink has them once the DSD marked them done: killed between the sink's answer and that mark, the
    # DSD leaves them "running" and the next one runs them again (the at-least-once window README names).
    r = node_cluster.redis.client()
    wait_for(lambda: [r.get(k) for k in r.keys("congress:t:executed:*")] == ["done"] * 3, 5,
             what="the 3 answered actions marked done")
    epoch_before = table_status(a)["epoch"]
    dsd.signal(signal.SIGKILL)
    dsd.proc.wait(5)
    push(b, [(3, "c"), (4, "d")])                    # rows 1 and 2 deleted while no DSD runs
    time.sleep(0.3)
    assert pe_rows(a) == {(1, "a"), (2, "b"), (3, "c")}   # nothing changes without a DSD
    dsd.start()
    converge([a, b], {(3, "c"), (4, "d")})
    for node in (a, b):
        st = wait_for(lambda: (s := table_status(node))["dsd_epoch"] == s["epoch"] and s, 5, what="DSD heartbeat")
        assert st["epoch"] > epoch_before
    wait_for(lambda: len(sink.ids()) >= 4, 10, what="the new row's action")
    time.sleep(1.0)
    assert sorted(x[0] for x in sink.args()) == [1, 2, 3, 4]   # row 3 did not fire again in the new epoch


@pytest.mark.slow
def test_dropped_middle_and_last_diffs_are_detected_and_resynced(node_cluster, sink):
    # seq 1 is the datasource's first (full) publication; push k publishes seq k + 1
    node_cluster.add("dsd", "d1", extra={"test_hooks": {"drop_publish": ["feed:items:3", "feed:items:6"]}})
    a = node_cluster.add("api-pe", "n1")
    b = node_cluster.add("api-pe", "n2")
    make_feed(a, sink.url)
    rows: set = set()
    for k in range(1, 6):
        rows = rows | {(k, f"r{k}")}
        push(a, sorted(rows))
        wait_for(lambda: table_status(a)["dsd_seq"] == k + 1, 5, what=f"DSD published seq {k + 1}")
    converge([a, b], rows)
    for node in (a, b):
        st = table_status(node)
        assert st["seq"] == 6 and st["resyncs"] >= 2, st   # the gap at 4 and the heartbeat showing 6
    dsd_log = (node_cluster.dir / "logs" / "d1-dsd.out").read_text()
    assert "publication feed:items:3 dropped" in dsd_log and "publication feed:items:6 dropped" in dsd_log
    wait_for(lambda: len(sink.ids()) >= 5, 10, what="5 actions")
    time.sleep(1.0)
    assert sorted(x[0] for x in sink.args()) == [1, 2, 3, 4, 5]


def test_a_row_the_leader_skipped_past_runs_from_the_other_pes_request(node_cluster, sink):
    """The leader PE drops diff 3 on arrival (as diffs waiting behind a resync are: packet-delay on the leader's
    host held its reader 1.3 s), so it never sees row 2, which came at seq 3 and went at seq 4; its resync jumps
    over it. n2 saw row 2: the leader's heartbeat reports the break, and the DSD runs n2's request for it."""
    node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1", extra={"test_hooks": {"skip_diffs": ["feed:items:3"]}})
    wait_for(lambda: (a.get("/v1/status")[1].get("dsd") or {}).get("leader", {}).get("node") == "n1", 10,
             what="n1 the DSD's leader")
    b = node_cluster.add("api-pe", "n2")
    make_feed(a, sink.url)
    push(a, [(1, "a")])
    converge([a, b], {(1, "a")})
    push(a, [(1, "a"), (2, "b")])
    push(a, [(1, "a")])
    push(a, [(1, "a"), (3, "c")])
    converge([a, b], {(1, "a"), (3, "c")})
    wait_for(lambda: len(sink.ids()) >= 3, 10, what="3 actions")
    time.sleep(1.0)
    assert sorted(x[0] for x in sink.args()) == [1, 2, 3]
    assert table_status(a)["resyncs"] >= 1 and table_status(b)["resyncs"] == 0
    assert "test hook: diff feed:items:3 dropped" in (node_cluster.dir / "logs" / "n1-api-pe.out").read_text()


@pytest.mark.slow
def test_redis_restart_all_nodes_reconnect_and_converge_nothing_lost(node_cluster, sink):
    d = node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1")
    b = node_cluster.add("api-pe", "n2")
    make_feed(a, sink.url)
    push(a, [(1, "a")])
    converge([a, b], {(1, "a")})
    node_cluster.redis.stop()
    wait_for(lambda: not a.get("/v1/status", timeout=2)[1]["bus"]["connected"], 10, what="n1 noticing its bus gone")
    assert a.get("/v1/policies/p/rules")[0] == 200          # reads answer from the node's copy meanwhile
    time.sleep(3)
    node_cluster.redis.start()
    for node in (a, b):
        node_cluster.wait_healthy(node, timeout=20)
    assert d.alive()
    push(b, [(1, "a"), (2, "b")])
    converge([a, b], {(1, "a"), (2, "b")})
    for node in (a, b):
        assert [p["name"] for p in node.get("/v1/policies")[1]["results"]] == ["p"]
        assert len(node.get("/v1/policies/p/rules")[1]["results"]) == 2
    wait_for(lambda: len(sink.ids()) >= 2, 10, what="2 actions")
    time.sleep(1.0)
    assert sorted(x[0] for x in sink.args()) == [1, 2]
    assert a.get("/v1/status")[1]["bus"]["connects"] >= 2


def test_periodic_full_sync_reads_no_rows_of_tables_in_step_and_repairs_the_others(node_cluster, sink):
    """The periodic full sync compares (epoch, seq), and the DSD the pushed rows' version, before reading
    rows: tables in step cost no row reads (parsing 100k rows takes a node's loop away for about half a
    second every interval). A table the store holds newer is still repaired: rows pushed with their
    notice lost reach the DSD, and a snapshot newer than a PE's replaces its table."""
    node_cluster.full_sync_s = 0.3
    node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1")
    make_feed(a, sink.url)
    push(a, [(1, "a"), (2, "b")])
    converge([a], {(1, "a"), (2, "b")})
    r = node_cluster.redis.client()

    def row_reads():
        stats = r.info("commandstats")
        return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("smembers", "mget"))
    before = row_reads()
    time.sleep(2.0)
    assert row_reads() == before
    ds_id = a.get("/v1/data-sources/feed")[1]["id"]
    r.set(f"congress:t:pushed:{ds_id}:items", '[[1,"a"],[2,"b"],[3,"c"]]')
    r.incr(f"congress:t:pushver:{ds_id}:items")
    converge([a], {(1, "a"), (2, "b"), (3, "c")})
    epoch, seq = table_status(a)["epoch"], table_status(a)["seq"]
    r.sadd(f"congress:t:snap:{ds_id}:items", '[4,"d"]')
    r.hset(f"congress:t:snapmeta:{ds_id}:items", mapping={"epoch": epoch, "seq": seq + 1})
    converge([a], {(1, "a"), (2, "b"), (3, "c"), (4, "d")})
