"""The api-pe REST API (Congress v1 shapes, error cases, cross-node visibility) on real processes + Redis."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
import urllib.parse

import pytest

from congressctl.node.api_pe import DRAIN_S, IN_FLIGHT_S
from fixtures_redis import ADMIN_TOKEN, wait_for


def push_ds(name, sink_url=None, tables=None):
    config = {"tables": tables or {"vms": {"columns": ["id", "state"]}}}
    if sink_url:
        config["action_url"] = sink_url
    return {"name": name, "driver": "push", "config": config, "description": "test"}


def test_policy_rule_and_datasource_lifecycle_with_congress_shapes(two_apis, sink):
    cluster, a, b = two_apis
    assert a.get("/v1")[1]["id"] == "v1"
    status, policy = a.request("POST", "/v1/policies", {"name": "classification", "description": "d"})
    assert status == 201
    assert set(policy) == {"id", "name", "description", "kind", "abbreviation", "owner_id"}
    status, ds = a.request("POST", "/v1/data-sources", push_ds("nova", sink.url))
    assert status == 201 and set(ds) >= {"id", "name", "driver", "config", "description", "enabled"}
    status, rule = a.request("POST", "/v1/policies/classification/rules",
                             {"rule": "bad(x) :- nova:vms(id=x, state=\"ERROR\")", "name": "r1", "comment": "c"})
    assert status == 201 and set(rule) == {"id", "name", "comment", "rule"}
    # visible on the other node by id and by name
    wait_for(lambda: b.get(f"/v1/policies/{policy['id']}/rules/{rule['id']}")[0] == 200, 5, what="rule on n2")
    assert b.get("/v1/policies/classification")[1]["id"] == policy["id"]
    assert b.get("/v1/data-sources/nova")[1]["id"] == ds["id"]
    assert [r["id"] for r in b.get("/v1/policies/classification/rules")[1]["results"]] == [rule["id"]]

    assert a.request("PUT", "/v1/data-sources/nova/tables/vms/rows",
                     [[1, "ACTIVE"], [2, "ERROR"], {"id": 3, "state": "ERROR"}])[0] == 200

    def rows(node, path):
        status, body = node.get(path)
        return status == 200 and sorted(tuple(r["data"]) for r in body["results"])
    for node in (a, b):
        wait_for(lambda: rows(node, "/v1/policies/classification/tables/bad/rows") == [(2,), (3,)], 5,
                 what=f"derived rows on {node.node_id}")
        assert rows(node, "/v1/data-sources/nova/tables/vms/rows") == [(1, "ACTIVE"), (2, "ERROR"), (3, "ERROR")]
    assert {"id": "bad"} in a.get("/v1/policies/classification/tables")[1]["results"]
    wait_for(lambda: a.get("/v1/data-sources/nova/status")[1]["number_of_updates"] >= 2, 5, what="ds status")

    assert b.request("DELETE", f"/v1/policies/classification/rules/{rule['id']}")[0] == 200
    wait_for(lambda: a.get("/v1/policies/classification/rules")[1]["results"] == [], 5, what="rule gone on n1")
    assert b.request("DELETE", "/v1/data-sources/nova")[0] == 200
    wait_for(lambda: a.get("/v1/data-sources/nova")[0] == 404, 5, what="datasource gone on n1")
    assert a.request("DELETE", "/v1/policies/classification")[0] == 200
    assert b.get("/v1/policies")[1] == {"results": []} or wait_for(
        lambda: b.get("/v1/policies")[1] == {"results": []}, 5, what="policy gone on n2")


def test_error_cases_are_clear_4xx_and_write_nothing(two_apis):
    cluster, a, b = two_apis
    assert a.request("POST", "/v1/policies", {"name": "p"})[0] == 201
    assert a.request("POST", "/v1/policies", {"name": "p"})[0] == 409
    assert b.request("POST", "/v1/policies", {"name": "p"})[0] == 409
    assert a.request("POST", "/v1/policies", {"name": "bad name"})[0] == 400
    status, body = a.request("POST", "/v1/policies/p/rules", {"rule": "q(x) :- r(x"})
    assert status == 400 and body["error"]["position"] is not None and body["error"]["kind"] == "syntax"
    status, body = a.request("POST", "/v1/policies/p/rules", {"rule": "q(x) :- r(y)"})
    assert status == 400 and body["error"]["kind"] == "safety"
    assert a.request("POST", "/v1/policies/p/rules", {"rule": "q(x) :- r(x)"})[0] == 201
    assert a.request("POST", "/v1/policies/p/rules", {"rule": "q(x)  :-  r(x)"})[0] == 409
    assert a.request("POST", "/v1/policies/nope/rules", {"rule": "q(x) :- r(x)"})[0] == 404
    assert a.get("/v1/policies/nope")[0] == 404
    assert a.get("/v1/policies/p/rules/nope")[0] == 404
    assert a.request("DELETE", "/v1/policies/p/rules/nope")[0] == 404
    assert a.get("/v1/policies/p/tables/nope/rows")[0] == 404
    assert a.get("/v1/data-sources/nope")[0] == 404
    assert a.request("POST", "/v1/data-sources", {"name": "x", "driver": "nova", "config": {}})[0] == 400
    assert a.request("POST", "/v1/data-sources", {"name": "x", "driver": "push",
                                                  "config": {"tables": {"t": []}}})[0] == 400
    assert a.request("POST", "/v1/data-sources", push_ds("p"))[0] == 409   # a policy has that name
    assert a.request("POST", "/v1/data-sources", push_ds("ds1"))[0] == 201
    assert a.request("PUT", "/v1/data-sources/ds1/tables/vms/rows", [[1]])[0] == 400
    assert a.request("PUT", "/v1/data-sources/ds1/tables/nope/rows", [])[0] == 404
    assert a.request("POST", "/v1/data-sources/ds1", {"name": "x"})[0] == 400  # no ?action=execute
    assert a.request("POST", "/v1/policies/p/rules", {"rule": "w(x) :- foo:t(x, y)"})[0] == 201
    status, body = a.request("POST", "/v1/data-sources", push_ds("foo", tables={"t": ["a"]}))
    assert status == 400 and body["error"]["kind"] == "schema"   # rules already use foo:t with 2 columns
    # nothing half-written: the store holds exactly what succeeded
    r = cluster.redis.client()
    assert set(r.hkeys("congress:t:policy-names")) == {"p"}
    assert set(r.hkeys("congress:t:ds-names")) == {"ds1"}
    assert r.exists("congress:t:pushed:" + a.get("/v1/data-sources/ds1")[1]["id"] + ":vms") == 0
    rules = b.get("/v1/policies/p/rules")[1]["results"]
    assert [x["rule"] for x in rules] == ["q(x) :- r(x)", "w(x) :- foo:t(x, y)"]
    assert a.get("/v1/openapi.json")[1]["paths"]["/v1/policies/{policy}/rules"]["post"]["summary"]


def test_concurrent_datasource_create_through_two_nodes_one_201_one_409(two_apis):
    cluster, a, b = two_apis
    for attempt in range(5):
        name = f"race{attempt}"
        results = {}
        barrier = threading.Barrier(2)

        def create(node):
            barrier.wait()
            results[node.node_id] = node.request("POST", "/v1/data-sources", push_ds(name))[0]
        threads = [threading.Thread(target=create, args=(n,)) for n in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(results.values()) == [201, 409]
    assert len(cluster.redis.client().hkeys("congress:t:ds-names")) == 5


def test_status_and_healthz_report_bus_peers_leader_and_tables(two_apis, sink):
    cluster, a, b = two_apis
    a.request("POST", "/v1/data-sources", push_ds("nova", sink.url))

    def status_complete():
        st = a.get("/v1/status")[1]
        return (st["dsd"] and st["dsd"]["leader"] and st["tables"] and st["tables"][0]["dsd_seq"] is not None
                and {(p["node"], p["role"]) for p in st["peers"] if p["alive"]}
                >= {("n1", "api-pe"), ("n2", "api-pe"), ("d1", "dsd")}
                and st)
    st = wait_for(status_complete, 10, what="complete status")
    assert st["synced"] and st["bus"]["connected"]
    assert st["dsd"]["leader"]["node"] in {"n1", "n2"}
    assert st["tables"][0]["table"] == "nova:vms" and st["tables"][0]["lag"] == 0
    assert set(st["dsd"]["counts"]) >= {"executed", "ignored", "replayed"}
    assert a.get("/healthz")[0] == 200


def test_sigterm_stops_cleanly_and_unhealthy_without_bus(node_cluster):
    a = node_cluster.add("api-pe", "n1")
    d = node_cluster.add("dsd", "d1")
    node_cluster.redis.stop()
    wait_for(lambda: a.get("/healthz", timeout=2)[0] == 503, 10, what="503 without bus")
    node_cluster.redis.start()
    wait_for(lambda: a.get("/healthz", timeout=2)[0] == 200, 10, what="200 after bus is back")
    for node in (a, d):
        started = time.monotonic()
        node.signal(signal.SIGTERM)
        node.proc.wait(timeout=10)
        elapsed = time.monotonic() - started
        assert node.proc.returncode == 0, node.log_text()[-2000:]
        print(f"{node.role} stopped in {elapsed:.2f}s")
        log = node.log_text()
        assert "stopped, exit code 0" in log
    lines = [l for l in (node_cluster.dir / "logs" / "n1" / "api-pe.log").read_text().splitlines() if l.strip()]
    assert lines and all(" n1 api-pe " in l for l in lines if l[:4].isdigit())
    assert node_cluster.redis.password not in (node_cluster.dir / "logs" / "n1" / "api-pe.log").read_text()


def _slow_post(port: int, path: str, body: bytes, sent: int) -> socket.socket:
    """A request in flight: its head and the first `sent` bytes of its body written, the rest held back."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (f"POST {path} HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            f"X-Auth-Token: {ADMIN_TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    conn.sendall(head + body[:sent])
    return conn


def _status_line(conn: socket.socket) -> str:
    return conn.makefile("rb").readline().decode().strip()


def test_sigterm_drains_healthz_503_at_once_and_a_request_in_flight_completes(node_cluster):
    """HAProxy sees 503 from /healthz at once (and stops sending) while the node still serves; after the
    drain no new connection is taken, the slow request still finishes, then the process exits 0."""
    a = node_cluster.add("api-pe", "n1")
    body = json.dumps({"name": "slowpolicy"}).encode()
    conn = _slow_post(a.api_port, "/v1/policies", body, 5)
    time.sleep(0.2)
    sent = time.monotonic()
    a.signal(signal.SIGTERM)
    wait_for(lambda: a.get("/healthz", timeout=1)[0] == 503, 1.0, what="/healthz 503 after SIGTERM")
    assert time.monotonic() - sent < 0.5
    assert a.get("/healthz")[1]["reason"].startswith("stopping")
    assert a.get("/v1/policies", timeout=2)[0] == 200, "still serving while draining"
    time.sleep(max(0.0, sent + DRAIN_S + 0.5 - time.monotonic()))
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", a.api_port), timeout=1).close()
    assert a.alive(), "the node left before its request in flight was answered"
    conn.sendall(body[5:])
    assert _status_line(conn) == "HTTP/1.1 201 Created"
    conn.close()
    assert a.proc.wait(timeout=5) == 0, a.log_text()[-2000:]
    assert time.monotonic() - sent < DRAIN_S + IN_FLIGHT_S
    assert "slowpolicy" in node_cluster.redis.client().hgetall("congress:t:policy-names")


def test_a_request_in_flight_that_never_ends_is_cut_after_the_bound(node_cluster):
    a = node_cluster.add("api-pe", "n1")
    conn = _slow_post(a.api_port, "/v1/policies", b'{"name": "never"}', 3)
    time.sleep(0.2)
    sent = time.monotonic()
    a.signal(signal.SIGTERM)
    assert a.proc.wait(timeout=DRAIN_S + IN_FLIGHT_S + 5) == 0, a.log_text()[-2000:]
    took = time.monotonic() - sent
    assert DRAIN_S + IN_FLIGHT_S - 0.5 < took < DRAIN_S + IN_FLIGHT_S + 3, took
    conn.close()


def test_a_node_that_never_synced_answers_503_not_an_empty_mirror(node_cluster):
    """HAProxy retries a 503 on another node; a 404 for a policy that exists would reach the client."""
    node_cluster.redis.stop()
    a = node_cluster.add("api-pe", "n1", start=False)
    a.start()
    wait_for(lambda: a.get("/healthz", timeout=2)[0] == 503, 15, what="the API listening, unhealthy")
    status, body = a.get("/v1/policies/anything/rules", timeout=2)
    assert status == 503 and "not synced" in body["error"]["message"]
    assert a.get("/v1/status", timeout=2)[0] == 200
    node_cluster.redis.start()
    node_cluster.wait_healthy(a)
    assert a.get("/v1/policies/anything/rules", timeout=2)[0] == 404


def test_a_write_through_one_node_is_found_at_once_through_another(two_apis):
    """Create then use through different nodes (as a load balancer sends them): never a 404 or a schema
    error, however late the notice. Also when the notice never comes (written here straight into the store,
    the notice counter moved on): the node waits a moment for it, then syncs from the store."""
    cluster, a, b = two_apis
    for i in range(15):
        assert a.request("POST", "/v1/data-sources", push_ds(f"quick{i}"))[0] == 201
        assert a.request("POST", "/v1/policies", {"name": f"qp{i}"})[0] == 201
        status, body = b.request("POST", f"/v1/policies/qp{i}/rules",
                                 {"rule": f"p(x) :- quick{i}:vms(id=x, state=\"up\")"})
        assert status == 201, body
        assert b.request("PUT", f"/v1/data-sources/quick{i}/tables/vms/rows", [["v", "up"]])[0] == 200
    r = cluster.redis.client()
    policy = {**json.loads(next(iter(r.hgetall("congress:t:policies").values()))), "id": "hidden-id", "name": "hidden"}
    r.hset("congress:t:policy-names", "hidden", "hidden-id")
    r.hset("congress:t:policies", "hidden-id", json.dumps(policy))
    r.incr("congress:t:notice-seq")
    started = time.monotonic()
    status, body = b.request("POST", "/v1/policies/hidden/rules", {"rule": "q(x) :- quick0:vms(id=x, state=\"up\")"})
    assert status == 201, body
    assert time.monotonic() - started < 4
    assert b.get("/v1/policies/hidden")[0] == 200
    assert a.get("/v1/policies/nothing-here")[0] == 404


def test_rows_put_on_a_kept_alive_connection_answers_like_every_other_request(two_apis):
    """The rows PUT has its own short path into the app, and responses go out as one send: on one HTTP/1.1
    connection kept alive (as HAProxy and clients keep it), every answer arrives whole, errors included."""
    cluster, a, b = two_apis
    assert a.request("POST", "/v1/data-sources", push_ds("kept"))[0] == 201
    u = urllib.parse.urlsplit(a.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    answers = []
    for method, path, body in [("PUT", "/v1/data-sources/kept/tables/vms/rows", [["v1", "up"]]),
                               ("PUT", "/v1/data-sources/kept/tables/vms/rows", {"not": "rows"}),
                               ("PUT", "/v1/data-sources/nope/tables/vms/rows", []),
                               ("PUT", "/v1/data-sources/kept/tables/nope/rows", []),
                               ("GET", "/v1/data-sources/kept/tables/vms/rows", None),
                               ("PUT", "/v1/data-sources/kept/tables/vms/rows/", [])]:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json", "X-Auth-Token": ADMIN_TOKEN})
        resp = conn.getresponse()
        answers.append((resp.status, resp.read()))
        assert not resp.will_close
    conn.close()
    assert answers[0] == (200, b"{}")
    assert answers[1][0] == 400 and b"error" in answers[1][1]
    assert answers[2][0] == 404 and b"nope" in answers[2][1]
    assert answers[3][0] == 404 and b"nope" in answers[3][1]
    assert answers[4][0] == 200 and json.loads(answers[4][1])["results"] in ([], [{"data": ["v1", "up"]}])
    assert answers[5][0] == 307   # not the short path: the app redirects to the path without the slash
    wait_for(lambda: b.get("/v1/data-sources/kept/tables/vms/rows")[1]["results"] == [{"data": ["v1", "up"]}],
             5, what="the pushed row on the other node")


def test_requests_waiting_for_the_same_lost_notice_share_one_full_sync(two_apis):
    """A notice lost for good makes a node wait for it, then sync from the store: with many clients asking
    for the object at once, that is one full sync for all of them, not one each."""
    cluster, a, b = two_apis
    assert a.request("POST", "/v1/policies", {"name": "seed"})[0] == 201
    wait_for(lambda: b.get("/v1/policies/seed")[0] == 200, 5, what="seed policy on n2")
    r = cluster.redis.client()
    policy = {**json.loads(next(iter(r.hgetall("congress:t:policies").values()))), "id": "lost-id", "name": "lost"}
    r.hset("congress:t:policy-names", "lost", "lost-id")
    r.hset("congress:t:policies", "lost-id", json.dumps(policy))
    r.incr("congress:t:notice-seq")
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(b.get("/v1/policies/lost", timeout=10)[0]))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert answers == [200] * 8
    assert b.log_text().count("not seen within") == 1
