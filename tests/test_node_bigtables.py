"""Big tables and the push log (issue 15): no pub/sub message over the bound, replace = diff, a PE joining during
a large push, the per-PUT row limit, and pushes missed while the DSD's bus session was down."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import pytest
import yaml
from fixtures_redis import wait_for

from congressctl.node.api_pe import keys_in_pieces, rows_in_pieces, split_rows
from congressctl.node.store import MESSAGE_MAX_BYTES, row_key, row_keys_of


def rows(node, path):
    return {tuple(r["data"]) for r in node.get(path, timeout=20)[1]["results"]}


def feed(node, **config):
    status, body = node.request("POST", "/v1/data-sources", {"name": "feed", "driver": "push", "config": {
        "tables": {"items": ["id", "v"]}, **config}})
    assert status == 201, body


def table_seq(node):
    tables = node.get("/v1/status")[1]["tables"]
    return tables[0]["seq"] if tables else 0


class Channel:
    """Every message of some channels, read in a thread from a subscription of the test's own."""

    def __init__(self, redis_server, *channels):
        self.pubsub = redis_server.client().pubsub()
        self.pubsub.subscribe(*channels)
        self.messages: list[tuple[str, bytes]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while self.pubsub.subscribed:
            msg = self.pubsub.get_message(timeout=0.1)
            if msg and msg["type"] == "message":
                channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
                data = msg["data"].encode() if isinstance(msg["data"], str) else msg["data"]
                self.messages.append((channel, data))

    def close(self):
        self.pubsub.unsubscribe()
        self.thread.join(timeout=2)
        self.pubsub.close()


def big_rows(n, tag="v"):
    return [[f"host-{i:07d}", f"{tag}-{i:07d}-some-longer-value"] for i in range(n)]


def test_a_push_larger_than_the_message_bound_reaches_every_pe_without_a_cut(node_cluster, redis_server):
    admin = redis_server.client()
    admin.config_set("client-output-buffer-limit", "pubsub 32mb 8mb 60")   # the production limit
    try:
        node_cluster.add("dsd", "d1")
        a = node_cluster.add("api-pe", "n1")
        b = node_cluster.add("api-pe", "n2")
        feed(a)
        wait_for(lambda: table_seq(a) >= 1 and table_seq(b) >= 1, 10, what="feed on both PEs")
        cut_before = admin.info("stats").get("client_output_buffer_limit_disconnections", 0)
        seen = Channel(redis_server, "congress:t:push", "congress:t:diff")
        path = "/v1/data-sources/feed/tables/items/rows"
        pushed = big_rows(40_000)
        assert len(json.dumps(pushed)) > 2 * MESSAGE_MAX_BYTES
        assert a.request("PUT", path, pushed, timeout=30)[0] == 200
        want = {tuple(r) for r in pushed}
        for node in (a, b):
            wait_for(lambda n=node: rows(n, path) == want, 30, what=f"every row on {node.node_id}")
        # a 1% change of it: a chunked diff, not the table
        changed = [*pushed[:-400], *([f"host-{i:07d}", f"new-{i:07d}"] for i in range(40_000, 40_400))]
        assert a.request("PUT", path, changed, timeout=30)[0] == 200
        want = {tuple(r) for r in changed}
        for node in (a, b):
            wait_for(lambda n=node: rows(n, path) == want, 30, what=f"the changed rows on {node.node_id}")
        seen.close()
        assert seen.messages
        assert max(len(data) for _, data in seen.messages) <= MESSAGE_MAX_BYTES
        assert admin.info("stats").get("client_output_buffer_limit_disconnections", 0) == cut_before
        for node in (a, b):
            assert "bus connection lost" not in node.log_text()
    finally:
        admin.config_set("client-output-buffer-limit", "pubsub 256mb 64mb 60")


def test_a_replace_that_changes_a_few_rows_publishes_only_those(node_cluster, redis_server):
    node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1")
    feed(a)
    wait_for(lambda: table_seq(a) >= 1, 10, what="feed on the PE")
    path = "/v1/data-sources/feed/tables/items/rows"
    first = [[f"h{i}", "old"] for i in range(2000)]
    assert a.request("PUT", path, first)[0] == 200
    wait_for(lambda: len(rows(a, path)) == 2000, 10, what="the first push on the PE")
    seen = Channel(redis_server, "congress:t:push", "congress:t:diff")
    time.sleep(0.2)
    second = [*first[2:], ["h0", "new"], ["h1", "new"]]
    assert a.request("PUT", path, second)[0] == 200
    wait_for(lambda: rows(a, path) == {tuple(r) for r in second}, 10, what="the second push on the PE")
    time.sleep(0.3)
    seen.close()
    notices = [json.loads(data) for channel, data in seen.messages if channel.endswith(":push")]
    diffs = [json.loads(data) for channel, data in seen.messages if channel.endswith(":diff")]
    assert len(notices) == 1 and len(diffs) == 1, seen.messages
    for msg in (notices[0], diffs[0]):
        assert sorted(map(tuple, msg["add"])) == [("h0", "new"), ("h1", "new")]
        assert sorted(map(tuple, msg["del"])) == [("h0", "old"), ("h1", "old")]
        assert "rows" not in msg


def test_a_pe_joining_during_a_large_push_ends_with_exactly_its_rows(node_cluster):
    node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1")
    feed(a)
    wait_for(lambda: table_seq(a) >= 1, 10, what="feed on the PE")
    path = "/v1/data-sources/feed/tables/items/rows"
    assert a.request("PUT", path, big_rows(60_000, tag="first"), timeout=30)[0] == 200
    final = big_rows(80_000, tag="second")
    answers = []
    pusher = threading.Thread(target=lambda: answers.append(a.request("PUT", path, final, timeout=60)[0]))
    pusher.start()
    b = node_cluster.add("api-pe", "n2")   # starts (and loads) while the push is stored and published
    pusher.join(timeout=60)
    assert answers == [200]
    want = {tuple(r) for r in final}
    for node in (a, b):
        wait_for(lambda n=node: rows(n, path) == want, 30, what=f"exactly the second push's rows on {node.node_id}")


def test_a_push_over_max_rows_per_put_is_refused_and_changes_nothing(node_cluster):
    node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1", start=False)
    doc = yaml.safe_load(a.config.read_text())
    doc["api"]["max_rows_per_put"] = 100
    a.config.write_text(yaml.safe_dump(doc))
    a.start()
    node_cluster.wait_healthy(a)
    feed(a)
    path = "/v1/data-sources/feed/tables/items/rows"
    kept = [[f"h{i}", "x"] for i in range(100)]
    assert a.request("PUT", path, kept)[0] == 200
    wait_for(lambda: len(rows(a, path)) == 100, 10, what="the first push")
    status, body = a.request("PUT", path, [[f"h{i}", "y"] for i in range(101)])
    assert status == 413
    assert "max_rows_per_put" in json.dumps(body) and "100" in json.dumps(body)
    large = big_rows(30_000)   # over a megabyte: parsed in pieces, refused all the same
    assert len(json.dumps(large)) > 1 << 20
    status, body = a.request("PUT", path, large, timeout=30)
    assert status == 413 and "30000 rows" in json.dumps(body)
    time.sleep(0.5)
    assert rows(a, path) == {tuple(r) for r in kept}


def test_pushes_missed_while_the_dsd_session_was_down_each_derive_their_actions(node_cluster, redis_server, sink):
    """Issue 12's lost actions: two pushes while the DSD hears nothing (paused, its subscription cut); the one in
    between was replaced by the last, yet its action runs, and every action once."""
    dsd = node_cluster.add("dsd", "d1")
    a = node_cluster.add("api-pe", "n1")
    b = node_cluster.add("api-pe", "n2")
    status, body = a.request("POST", "/v1/data-sources", {"name": "feed", "driver": "push", "config": {
        "tables": {"items": ["id"]}, "action_url": sink.url}})
    assert status == 201, body
    assert a.request("POST", "/v1/policies", {"name": "p"})[0] == 201
    assert a.request("POST", "/v1/policies/p/rules", {"rule": "execute[feed:hit(x)] :- feed:items(id=x)"})[0] == 201
    wait_for(lambda: b.get("/v1/policies/p/rules")[1]["results"], 10, what="rule on the second PE")
    path = "/v1/data-sources/feed/tables/items/rows"
    assert a.request("PUT", path, [["one"]])[0] == 200
    wait_for(lambda: sink.args() == [("one",)], 10, what="the first push's action")
    connects = {node.node_id: node.get("/v1/status")[1]["bus"]["connects"] for node in (a, b)}
    dsd.signal(signal.SIGSTOP)
    try:
        admin = redis_server.client()
        wait_for(lambda: admin.client_kill_filter(_type="pubsub"), 5, what="subscriptions cut")
        # the PEs resubscribe and resync (answering 503 meanwhile); the paused DSD cannot. Pushes before a PE is
        # back would be judged on what a PE missed, not the DSD: its resync reads the table as it is then
        for node in (a, b):
            wait_for(lambda node=node: node.get("/v1/status")[1]["bus"]["connects"] > connects[node.node_id], 10,
                     what=f"{node.node_id} subscribed again")
            node_cluster.wait_healthy(node)
        assert a.request("PUT", path, [["two"]])[0] == 200
        assert a.request("PUT", path, [["three"]])[0] == 200
    finally:
        dsd.signal(signal.SIGCONT)
    try:
        wait_for(lambda: sorted(sink.args()) == [("one",), ("three",), ("two",)], 15,
                 what="the actions of both pushes made while the DSD was away")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the sink has {sink.args()}") from None
    time.sleep(1.0)
    assert sorted(sink.args()) == [("one",), ("three",), ("two",)]
    assert len(set(sink.ids())) == 3
    for node in (a, b):
        assert rows(node, path) == {("three",)}


TRICKY = [["a],[b", "x"], {"data": ["c},{d", 1]}, {"id": "e", "v": [1, [2, "],"]]}, ["f\\\"],", 2.5],
          ["g", {"k": "}, {"}]]


@pytest.mark.parametrize("indent", [None, 1])
def test_a_large_body_parsed_in_pieces_is_the_body_parsed_whole(indent):
    """Cut points inside strings and nested values make a piece invalid, and it is parsed with the rest: the
    rows are the same as one json.loads, in order, whatever the rows hold."""
    body = [TRICKY[i % len(TRICKY)] for i in range(3000)]
    raw = json.dumps(body, indent=indent).encode()
    for piece_bytes in (7, 64, 1000):
        assert b",".join(split_rows(raw, piece_bytes)) == raw.strip()[1:-1]
    simple = [["h", i] for i in range(3000)]
    pieces = asyncio.run(rows_in_pieces(json.dumps(simple, indent=indent).encode(), 100))
    assert len(pieces) > 100 and [r for p in pieces for r in p] == simple
    for piece_bytes in (7, 64, 1000):
        pieces = asyncio.run(rows_in_pieces(raw, piece_bytes))
        assert [r for p in pieces for r in p] == body
    keys = asyncio.run(keys_in_pieces(pieces, ["id", "v"]))
    coerced = [("a],[b", "x"), ("c},{d", 1), ("e", '[1,[2,"],"]]'), ('f\\"],', 2.5), ("g", '{"k":"}, {"}')]
    assert keys == [row_key(r) for _ in range(600) for r in coerced]
    assert row_keys_of([("a", 1), ("b", 2.5)]) == ['["a",1]', '["b",2.5]']
    for bad in (b"[" + raw[1:-1] + b",]", b'{"rows": []}', b"[[1],[2]"):
        try:
            result = asyncio.run(rows_in_pieces(bad, 100))
        except ValueError:
            continue
        assert not all(isinstance(p, list) for p in result)   # not a list: refused as such by the API


def test_rows_longer_than_the_cut_search_window_are_cut_where_they_end():
    """The next cut is looked for in a 64 KB window, then to the end: a row longer than the window still ends
    its piece, and list rows (no "},") never search the body to its end for each piece."""
    body = [["long", "x" * 100_000], {"id": "o", "v": "y" * 70_000}, ["short", 1]] * 3
    raw = json.dumps(body).encode()
    pieces = split_rows(raw, 10)
    assert len(pieces) == len(body) and b",".join(pieces) == raw[1:-1]
    assert [r for p in asyncio.run(rows_in_pieces(raw, 10)) for r in p] == body
