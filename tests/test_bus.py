"""The control bus and store against a real redis-server, and the DSD's leader/exactly-once bookkeeping."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
import uvloop

from congressctl.bus import COMMAND_TIMEOUT_S, Bus, Channels, command, make_redis
from congressctl.errors import BusError
from congressctl.node.dsd import SAME_ACTION_WINDOW_S, Leadership, PeerKey, Request, requests_of
from congressctl.node import store as store_module
from congressctl.node.store import Store, row_key
from congressctl.payloads import PeHeartbeat


def run(coro):
    return asyncio.run(coro)


def client_for(server, password=None):
    return make_redis(server.host, server.port, password or server.password)


# -- store ------------------------------------------------------------------------------------------------

def test_a_write_to_a_connection_closed_under_redis_py_is_a_bus_error():
    """On uvloop (the nodes' loop) a write to a transport closed under redis-py raises RuntimeError ("the handler
    is closed"), which redis-py passes on after dropping the connection: it stopped every api-pe at its next
    action publish after a bus failover (seen in the lab's logs). It is the bus gone, like a reset."""
    async def closed() -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    async def go():
        await command(closed(), "publish to x failed")
    with pytest.raises(BusError, match="publish to x failed: RuntimeError: .*handler is closed"):
        uvloop.run(go())



def test_concurrent_datasource_create_makes_exactly_one(redis_server):
    async def go():
        a, b = client_for(redis_server), client_for(redis_server)
        sa, sb = Store(a, Channels("c")), Store(b, Channels("c"))
        ds = {"name": "nova", "driver": "push", "config": {"tables": {"t": {"columns": ["x"]}}},
              "description": "", "enabled": True}
        results = await asyncio.gather(*[s.create_datasource({**ds, "id": f"id{i}"})
                                         for i, s in enumerate([sa, sb] * 5)])
        listed = await sa.datasources()
        await a.aclose(), await b.aclose()
        return results, listed
    results, listed = run(go())
    assert results.count(True) == 1
    assert [d["name"] for d in listed] == ["nova"]


def test_publish_table_keeps_snapshot_and_seq_together_and_refuses_stale_epoch(redis_server):
    async def go():
        r = client_for(redis_server)
        store = Store(r, Channels("c"))
        listener = client_for(redis_server)
        pubsub = listener.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(store.ch.diff)
        rows = [row_key((i, f"r{i}")) for i in range(3)]
        assert await store.publish_table("d1", "ds", "t", 5, 1, rows, [], full=True)
        assert await store.publish_table("d1", "ds", "t", 5, 2, [row_key((9, "r9"))], [rows[0]], full=False)
        assert await store.publish_table("d1", "ds", "t", 5, 3, [row_key((10, "x"))], [], full=False, publish=False)
        stale = await store.publish_table("d1", "ds", "t", 4, 9, [row_key((66, "stale"))], [], full=False)
        snap = await store.snapshot("d1", "t")
        messages = []
        while len(messages) < 2:
            msg = await pubsub.get_message(timeout=2)
            if msg:
                messages.append(json.loads(msg["data"]))
        extra = await pubsub.get_message(timeout=0.3)
        await pubsub.aclose(), await listener.aclose(), await r.aclose()
        return stale, snap, messages, extra
    stale, snap, messages, extra = run(go())
    assert stale is False
    assert (snap.epoch, snap.seq) == (5, 3)
    assert snap.rows == {(1, "r1"), (2, "r2"), (9, "r9"), (10, "x")}
    assert messages[0]["full"] is True and messages[0]["rows"] == [[0, "r0"], [1, "r1"], [2, "r2"]]
    assert (messages[1]["seq"], messages[1]["add"], messages[1]["del"]) == (2, [[9, "r9"]], [[0, "r0"]])
    assert extra is None  # seq 3 was stored but its publication dropped (the test hook path)


def test_a_small_snapshot_is_one_round_trip_and_a_large_one_is_read_whole_in_pieces(redis_server, monkeypatch):
    """A resync holds its table's diffs waiting: a small table's snapshot is one command (read in pieces, it took
    11 round trips while publications kept coming). Past CHUNK_ROWS it is read in pieces, every row still there."""
    monkeypatch.setattr(store_module, "CHUNK_ROWS", 4)

    async def go():
        r = client_for(redis_server)
        store = Store(r, Channels("c"))
        await store.publish_table("d1", "ds", "small", 2, 1, [row_key((i, "s")) for i in range(4)], [], full=True)
        await store.publish_table("d1", "ds", "big", 2, 7, [row_key((i, "b")) for i in range(40)], [], full=True)
        calls = await r.info("commandstats")
        small = await store.snapshot("d1", "small")
        between = await r.info("commandstats")
        big = await store.snapshot("d1", "big")
        after = await r.info("commandstats")
        await r.aclose()
        return small, big, [{k: v["calls"] for k, v in c.items()} for c in (calls, between, after)]
    small, big, (calls, between, after) = run(go())
    assert (small.epoch, small.seq, small.rows) == (2, 1, {(i, "s") for i in range(4)})
    assert (big.epoch, big.seq, big.rows) == (2, 7, {(i, "b") for i in range(40)})
    spent = {k: n - calls.get(k, 0) for k, n in between.items() if n != calls.get(k, 0)}
    # the script's own commands count too: what matters is that nothing was read in pieces
    assert set(spent) <= {f"cmdstat_{c}" for c in ("evalsha", "eval", "script|load", "info", "hmget", "scard", "smembers")}, spent
    # SSCAN's COUNT is a hint (one call may bring 4 rows or 9): 40 rows four at a time take several
    assert after.get("cmdstat_sscan", 0) - between.get("cmdstat_sscan", 0) >= 2


def test_claims_run_each_action_once_per_epoch_and_hand_over_unanswered_ones(redis_server):
    async def go():
        r = client_for(redis_server)
        store = Store(r, Channels("c"))
        await store.next_epoch()
        first = await asyncio.gather(*[store.settle_actions(["abc", f"x{i}"], [], 1, 60) for i in range(5)])
        again = await store.settle_actions(["abc", "x0", "new"], [], 1, 60)
        assert await store.settle_actions([], ["abc"], 1, 60) == []
        ttl = await r.ttl("congress:c:executed:abc")
        await store.next_epoch()
        # epoch 2: "abc" was answered (done); "x0" was claimed by epoch 1 but never marked done
        later = await store.settle_actions(["abc", "x0"], [], 2, 60)
        later_again = await store.settle_actions(["x0"], [], 2, 60)
        await store.next_epoch()
        stale = await store.settle_actions(["fresh"], ["x0"], 2, 60)
        x0 = await r.get("congress:c:executed:x0")
        fresh_left = await r.exists("congress:c:executed:fresh")
        await r.aclose()
        return first, again, ttl, later, later_again, stale, fresh_left, x0
    first, again, ttl, later, later_again, stale, fresh_left, x0 = run(go())
    assert [c[0] for c in first].count(True) == 1
    assert all(c[1] for c in first)
    assert again == [False, False, True]
    assert 0 < ttl <= 60
    assert later == [False, True]
    assert later_again == [False]
    assert stale is None and fresh_left == 0
    assert x0 == "done"   # a stale DSD still records the POSTs that were answered


def test_a_claim_whose_answer_was_lost_runs_when_its_dsd_claims_it_again_and_only_then(redis_server):
    """A bus failover can cut the claim's round trip after Redis kept (and replicated) the claim: the DSD,
    which POSTed nothing, tries again, and must find its own claim its own. Only a retried claim does: a second
    request for a claimed id still runs nothing, nor does a retried claim already answered."""
    async def go():
        r = client_for(redis_server)
        store = Store(r, Channels("c"))
        epoch = await store.next_epoch()
        first = await store.settle_actions(["lost-answer"], [], epoch, 60)
        again = await store.settle_actions(["lost-answer"], [], epoch, 60)
        retried = await store.settle_actions(["lost-answer"], [], epoch, 60, retried={"lost-answer"})
        await store.settle_actions([], ["lost-answer"], epoch, 60)
        after_done = await store.settle_actions(["lost-answer"], [], epoch, 60, retried={"lost-answer"})
        await r.aclose()
        return first, again, retried, after_done
    assert run(go()) == ([True], [False], [True], [False])


def test_pushed_rows_carry_a_version_in_store_and_notice(redis_server):
    async def go():
        r = client_for(redis_server)
        ch = Channels("c")
        store = Store(r, ch)
        ds = {"id": "d1", "name": "feed", "config": {"tables": {"t": {"columns": ["a"]}}}}
        assert not await store.push_rows(ds, "t", [[1]])   # no such datasource: nothing written
        never = await store.pushed_rows("d1", "t")
        await store.create_datasource(ds)
        pubsub = r.pubsub()
        await pubsub.subscribe(ch.push)
        await pubsub.get_message(timeout=1)
        assert await store.push_rows(ds, "t", [[1], [2]])
        assert await store.push_rows(ds, "t", [[3]])
        notices = [json.loads((await pubsub.get_message(timeout=1))["data"]) for _ in range(2)]
        latest = await store.pushed_rows("d1", "t")
        await store.delete_datasource(ds)
        left = await r.keys("congress:c:push*")
        await pubsub.aclose()
        await r.aclose()
        return never, notices, latest, left
    never, notices, latest, left = run(go())
    assert never == (0, [])
    # a replace is published as its difference against the previous push (issue 15)
    for n in notices:
        n["add"].sort()
        n["del"].sort()
    assert notices == [{"ds_id": "d1", "table": "t", "v": 1, "n_add": 2, "n_del": 0, "add": [[1], [2]], "del": []},
                       {"ds_id": "d1", "table": "t", "v": 2, "n_add": 1, "n_del": 2, "add": [[3]],
                        "del": [[1], [2]]}]
    assert latest == (2, [(3,)])
    assert left == []


async def _large_feed(redis_server) -> tuple:
    """A client, a store with datasource "feed" (table t, two columns), and 25k rows for it (more than CHUNK_ROWS)."""
    r = client_for(redis_server)
    store = Store(r, Channels("c"))
    ds = {"id": "d1", "name": "feed", "config": {"tables": {"t": {"columns": ["a", "b"]}}}}
    await store.create_datasource(ds)
    return r, store, ds, [[f"h{i}", "x"] for i in range(25_000)]


def test_a_large_push_is_diffed_in_pieces_and_a_push_meanwhile_is_not_lost(redis_server):
    """A push of more than CHUNK_ROWS rows, or onto a table that large, has its difference computed in bounded
    steps (no SDIFFSTORE stopping Redis); the switch stays one script, redone when another push came between."""
    async def go():
        r, store, ds, first = await _large_feed(redis_server)
        assert await store.push_rows(ds, "t", first) == 1
        second = [*first[:-3], ["new", "1"], ["new", "2"]]
        assert await store.push_rows(ds, "t", second) == 2
        diff2 = await store.push_diff("d1", "t", 2)
        few = [["only", "one"]]   # few rows onto a large table: staged too
        assert await store.push_rows(ds, "t", few) == 3
        diff3 = await store.push_diff("d1", "t", 3)
        # another push lands while a large one computes its difference: the large one diffs again against it
        original = store._diff_in_pieces
        other = Store(client_for(redis_server), Channels("c"))
        interfered = []

        async def diff_with_a_push_between(source, against, out):
            if not interfered:
                interfered.append(await other.push_rows(ds, "t", [["x", "y"]]))
            await original(source, against, out)
        store._diff_in_pieces = diff_with_a_push_between
        assert await store.push_rows(ds, "t", first) == 5
        diff5 = await store.push_diff("d1", "t", 5)
        latest = await store.pushed_rows("d1", "t")
        left = await r.keys("congress:c:pushtmp*")
        await r.aclose(), await other.redis.aclose()
        return diff2, diff3, interfered, diff5, latest, left
    diff2, diff3, interfered, diff5, latest, left = run(go())
    assert sorted(diff2[0]) == [row_key(["new", "1"]), row_key(["new", "2"])]
    assert sorted(diff2[1]) == sorted(row_key([f"h{i}", "x"]) for i in range(24_997, 25_000))
    assert diff3[0] == [row_key(["only", "one"])] and len(diff3[1]) == 24_999
    assert interfered == [4]
    assert diff5[1] == [row_key(["x", "y"])] and len(diff5[0]) == 25_000
    assert latest[0] == 5 and len(latest[1]) == 25_000
    assert left == []


def test_keys_staged_then_renamed_into_place_do_not_expire(redis_server):
    """Staged rows expire (a push or publication that failed midway leaves nothing for good), and RENAME carries
    the TTL along: the pushed rows, their log entry and the snapshot must not take it with them."""
    async def go():
        r, store, ds, first = await _large_feed(redis_server)
        await store.push_rows(ds, "t", first)
        await store.push_rows(ds, "t", [*first[:12_000], *([f"n{i}", "y"] for i in range(12_000))])
        keys = {k: await r.ttl(k) for k in await r.keys("congress:c:push*")}
        rows = {row_key(x) for x in first}
        assert await store.publish_table("d1", "feed", "t", 1, 1, [], [], True, new_rows=rows)
        keys[store.k_snap("d1", "t")] = await r.ttl(store.k_snap("d1", "t"))
        await r.aclose()
        return keys
    keys = run(go())
    assert {k.rsplit(":", 1)[-1] for k in keys} >= {"t", "add", "del"} and len(keys) >= 5
    assert all(ttl == -1 for ttl in keys.values()), keys


def test_policy_and_rule_writes_are_atomic_with_notices(redis_server):
    async def go():
        r = client_for(redis_server)
        store = Store(r, Channels("c"))
        policy = {"id": "p1", "name": "pol"}
        assert await store.create_policy(policy)
        assert not await store.create_policy({"id": "p2", "name": "pol"})
        rule = await store.add_rule(policy, {"id": "r1", "name": "", "comment": "", "rule": "p(x) :- q(x)"})
        gone = await store.add_rule({"id": "nope", "name": "x"}, {"id": "r2", "name": "", "comment": "", "rule": "a"})
        rules = await store.rules("p1")
        assert await store.delete_policy(policy)
        after = await store.rules("p1"), await store.policies()
        await r.aclose()
        return rule, gone, rules, after
    rule, gone, rules, after = run(go())
    assert rule["n"] >= 1 and gone is None
    assert [x["id"] for x in rules] == ["r1"]
    assert after == ([], [])


# -- bus --------------------------------------------------------------------------------------------------

class Probe:
    def __init__(self, server, node, password=None, peer_timeout=0.3):
        self.client = client_for(server, password)
        self.connects = 0
        self.messages: list[tuple[str, dict]] = []
        ch = Channels("c")
        beat = PeHeartbeat(node=node, inc=f"inc-{node}").to_dict() | {"extra": node}
        self.bus = Bus(self.client, ch, heartbeat_s=0.05, peer_timeout_s=peer_timeout, subscribe=[ch.notice],
                       on_message=self.on_message, on_connect=self.on_connect, heartbeat_payload=lambda: beat)

    async def on_message(self, channel, data):
        self.messages.append((channel, data))

    async def on_connect(self):
        self.connects += 1

    def start(self):
        return [asyncio.create_task(self.bus.run()), asyncio.create_task(self.bus.heartbeat_loop())]

    async def stop(self, tasks):
        self.bus.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        await self.client.aclose()


async def until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


def alive(bus: Bus) -> set[str]:
    """The peers heard within peer_timeout: those the api-pe's /v1/status reports alive."""
    now = time.monotonic()
    return {p.node for p in bus.peers.values() if p.age(now) <= bus.peer_timeout_s}


def test_heartbeats_make_peers_and_silence_loses_them(redis_server):
    async def go():
        a, b = Probe(redis_server, "a"), Probe(redis_server, "b")
        ta, tb = a.start(), b.start()
        await until(lambda: alive(a.bus) == {"a", "b"})
        peer_b = a.bus.peers[("b", "api-pe")]
        await b.stop(tb)
        await until(lambda: alive(a.bus) == {"a"})
        await a.stop(ta)
        return peer_b
    peer_b = run(go())
    assert peer_b.incarnation == "inc-b" and peer_b.payload["extra"] == "b"


def test_reconnects_and_resyncs_after_redis_restart(redis_server):
    async def go():
        a = Probe(redis_server, "a")
        tasks = a.start()
        await until(lambda: a.bus.connected and a.connects == 1)
        await asyncio.to_thread(redis_server.stop)
        await until(lambda: not a.bus.connected)
        await asyncio.to_thread(redis_server.start)
        await until(lambda: a.bus.connected and a.connects == 2)
        await a.bus.publish(a.bus.channels.notice, {"hello": 1})
        await until(lambda: any(ch == a.bus.channels.notice for ch, _ in a.messages))
        await a.stop(tasks)
    run(go())


def test_a_subscription_cut_by_redis_ends_the_session_so_the_owner_resyncs(redis_server):
    """Redis (or a proxy) dropping the subscriber's connection, Redis itself staying up: the bus must
    subscribe again through on_connect (the owner resyncs: what was published meanwhile is lost), not let
    redis-py resubscribe silently."""
    async def go():
        a = Probe(redis_server, "a")
        tasks = a.start()
        await until(lambda: a.bus.connected and a.connects == 1)
        killed = await asyncio.to_thread(redis_server.client().client_kill_filter, _type="pubsub")
        await until(lambda: a.connects == 2)
        a.messages.clear()
        await a.bus.publish(a.bus.channels.notice, {"after": 1})
        await until(lambda: any(ch == a.bus.channels.notice for ch, _ in a.messages))
        await a.stop(tasks)
        return killed, a.bus.reconnects
    killed, reconnects = run(go())
    assert killed == 1 and reconnects == 2


def test_a_silent_subscription_is_cut_and_made_again(redis_server):
    """Redis frozen (SIGSTOP): no message comes, not even our own heartbeat. The reader waits without a
    timeout of its own, so the watchdog must cut it; after SIGCONT the bus subscribes again and resyncs."""
    async def go():
        a = Probe(redis_server, "a")
        tasks = a.start()
        await until(lambda: a.bus.connected and a.connects == 1)
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            await until(lambda: "no message" in (a.bus.last_error or ""), timeout=5)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        await until(lambda: a.bus.connected and a.connects == 2)
        await a.stop(tasks)
    run(go())


def test_a_reader_stuck_in_a_handler_is_cut_and_the_bus_subscribes_again(redis_server):
    """A handler that never returns (any future bug of the owner's) must not wedge the node: the reader reads
    nothing more, so the watchdog ends the session after silent_limit, and the bus subscribes again."""
    async def go():
        a = Probe(redis_server, "a")
        never = asyncio.Event()

        async def stuck_on_notice(channel, data):
            if channel == a.bus.channels.notice:
                await never.wait()
            a.messages.append((channel, data))
        a.bus.on_message = stuck_on_notice
        tasks = a.start()
        await until(lambda: a.bus.connected and a.connects == 1)
        await a.bus.publish(a.bus.channels.notice, {"wedge": 1})
        await until(lambda: a.connects == 2 and alive(a.bus) == {"a"})
        await a.stop(tasks)
    run(go())


def test_every_command_is_bounded_when_redis_hangs(redis_server):
    """The client has no socket timeout of its own: a frozen Redis must still fail a store command or a
    publish with BusError after COMMAND_TIMEOUT_S, never hang the node."""
    async def go():
        r = client_for(redis_server)
        store = Store(r, Channels("c"))
        await store.policies()
        redis_server.proc.send_signal(signal.SIGSTOP)
        outcomes = []
        bus = Bus(r, Channels("c"), heartbeat_s=0.1, peer_timeout_s=0.3, subscribe=[], on_message=None,
                  on_connect=None, heartbeat_payload=dict)
        try:
            for call in (store.policies(), store.notice_seq(), bus.publish("c", {"x": 1})):
                started = asyncio.get_running_loop().time()
                try:
                    await asyncio.wait_for(call, COMMAND_TIMEOUT_S + 3)
                    outcomes.append("answered")
                except BusError:
                    outcomes.append(round(asyncio.get_running_loop().time() - started))
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        await r.aclose()
        return outcomes
    assert run(go()) == [COMMAND_TIMEOUT_S] * 3


def test_wrong_password_never_connects(redis_server):
    async def go():
        a = Probe(redis_server, "a", password="wrong")
        tasks = a.start()
        await until(lambda: a.bus.last_error is not None)
        connected = a.bus.connected
        await a.stop(tasks)
        return connected, a.bus.last_error
    connected, error = run(go())
    assert not connected
    assert "wrong" not in error and ("auth" in error.lower() or "password" in error.lower())


# -- leadership (pure) ------------------------------------------------------------------------------------

def req(i, pe, t):
    return Request(id=f"a{i}", datasource="ds", action="act", args=[i], pe=pe, received=t)


A, B = ("pe-a", "1"), ("pe-b", "1")


def test_first_pe_heard_leads_and_followers_are_buffered():
    lead = Leadership(peer_timeout_s=1.0, buffer_s=3.0)
    assert lead.heard(A, 0.0) == []
    lead.heard(B, 0.1)
    assert lead.leader == A
    assert [r.id for r in lead.request(req(1, A, 0.2), 0.2)] == ["a1"]
    assert lead.request(req(1, B, 0.25), 0.25) == []
    assert lead.request(req(1, A, 0.3), 0.3) == []  # duplicate from the leader
    assert lead.counts.ignored == 2  # the follower's copy of a1 and the leader's repeat
    assert lead.request(req(2, B, 0.4), 0.4) == []
    assert lead.tick(0.9) == []
    assert lead.leader == A


def test_leader_loss_replays_unexecuted_buffered_requests_exactly_once():
    lead = Leadership(peer_timeout_s=1.0, buffer_s=3.0)
    lead.heard(A, 0.0), lead.heard(B, 0.0)
    ran = []
    for i in range(5):
        ran += lead.request(req(i, A, 0.1), 0.1)
        ran += lead.request(req(i, B, 0.1), 0.1)
    for i in range(5, 8):                       # A is dead: only B's requests arrive
        ran += lead.request(req(i, B, 0.5), 0.5)
    lead.heard(B, 1.2)
    ran += lead.tick(1.2)                       # A silent for > 1 s
    assert lead.leader == B
    assert sorted(r.id for r in ran) == [f"a{i}" for i in range(8)]
    assert lead.counts.replayed == 3
    ran2 = lead.request(req(8, B, 1.3), 1.3)
    assert [r.id for r in ran2] == ["a8"]


def test_paused_old_leader_coming_back_causes_no_duplicates():
    lead = Leadership(peer_timeout_s=1.0, buffer_s=3.0)
    lead.heard(A, 0.0), lead.heard(B, 0.0)
    ran = lead.request(req(0, A, 0.1), 0.1) + lead.request(req(0, B, 0.1), 0.1)
    ran += lead.request(req(1, B, 0.2), 0.2)    # A paused before sending a1
    lead.heard(B, 1.5)
    ran += lead.tick(1.5)
    assert lead.leader == B
    ran += lead.request(req(1, A, 3.0), 3.0)    # A resumes with stale requests
    ran += lead.request(req(2, A, 3.0), 3.0)
    ran += lead.request(req(2, B, 3.0), 3.0)
    assert lead.leader == B
    assert sorted(r.id for r in ran) == ["a0", "a1", "a2"]
    lead.heard(A, 4.2)
    ran += lead.tick(4.5)                       # now B dies: A takes over, its a1/a2 already ran
    assert lead.leader == A
    assert sorted(r.id for r in ran) == ["a0", "a1", "a2"]


def test_a_leader_back_from_a_bus_outage_runs_once_what_the_others_asked_for_meanwhile():
    """A (the leader) loses its subscription while the DSD, off the bus too, forgives its silence: A resyncs
    from a snapshot and never asks for rows 1 and 2, which came and went meanwhile; B saw them. A's next
    session runs B's buffered requests, less row 3, which A's resync named its own way and ran."""
    lead = Leadership(peer_timeout_s=1.0, buffer_s=3.0)
    lead.heard(A, 0.0, 1), lead.heard(B, 0.0, 1)
    ran = lead.request(req(0, A, 0.1), 0.1) + lead.request(req(0, B, 0.1), 0.1)
    for i in (1, 2, 3):
        ran += lead.request(req(i, B, 0.5), 0.5)
    assert lead.heard(A, 0.6, 1) == [] and lead.heard(B, 0.6, 1) == []      # same sessions: nothing to do
    ran += lead.request(Request(id="a3-resync", datasource="ds", action="act", args=[3], pe=A, received=0.7), 0.7)
    ran += lead.heard(A, 0.8, 2)
    assert sorted(r.id for r in ran) == ["a0", "a1", "a2", "a3-resync"]
    assert lead.leader == A and lead.counts.replayed == 2
    assert lead.heard(A, 0.9, 2) == [] and lead.request(req(4, B, 1.9), 1.9) == []   # B follows again


def test_a_leader_that_skipped_diffs_runs_the_others_requests_also_those_still_held():
    """A (the leader) stays on the bus, but a resync of its made it drop diffs 1 and 2 as old (packet-delay on its
    host): its breaks go up. B's buffered request for row 1 runs at once; B's request for row 2, held a heartbeat
    before sending, arrives after A's heartbeat and runs too; B's request for row 0, which A ran, runs nothing.
    One peer timeout later B's requests wait again."""
    lead = Leadership(peer_timeout_s=1.0, buffer_s=3.0)
    lead.heard(A, 0.0, 1), lead.heard(B, 0.0, 1)
    ran = lead.request(req(0, A, 0.1), 0.1) + lead.request(req(1, B, 0.3), 0.3)
    ran += lead.heard(A, 0.4, 2)
    ran += lead.request(req(2, B, 0.5), 0.5) + lead.request(req(0, B, 0.5), 0.5)
    assert [r.id for r in ran] == ["a0", "a1", "a2"]
    assert lead.request(req(3, B, 1.5), 1.5) == [] and lead.leader == A


def test_another_pes_name_for_an_action_that_ran_runs_nothing_but_the_same_pes_does():
    """A's request ran row 1 as a1; B saw the row appear through another change and names it b1: B's resend
    (direct) and B's replay as the new leader run nothing. A row that appears again (A names it anew) runs again,
    and so does B's copy once SAME_ACTION_WINDOW_S has passed."""
    def named(name: str, i: int, pe: PeerKey, t: float, *, direct: bool = False) -> Request:
        return Request(id=name, datasource="ds", action="act", args=[i], pe=pe, direct=direct, received=t)
    lead = Leadership(peer_timeout_s=1.0, buffer_s=3.0)
    lead.heard(A, 0.0), lead.heard(B, 0.0)
    assert [r.id for r in lead.request(named("a1", 1, A, 0.1), 0.1)] == ["a1"]
    assert lead.request(named("b1", 1, B, 0.2, direct=True), 0.2) == []
    lead.request(named("b2", 2, B, 0.3), 0.3)                       # buffered: A leads
    lead.request(named("a2", 2, A, 0.3), 0.3)
    lead.request(named("b3", 3, B, 0.4), 0.4)                       # A died before it sent its a3
    lead.heard(B, 1.5)
    assert [r.id for r in lead.tick(1.5)] == ["b3"]                 # b2 is a2, which ran
    assert [r.id for r in lead.request(named("b1-again", 1, B, 2.0), 2.0)] == []
    assert [r.id for r in lead.request(named("a1-again", 1, A, 2.1, direct=True), 2.1)] == ["a1-again"]
    late = 2.1 + SAME_ACTION_WINDOW_S + 0.1
    assert [r.id for r in lead.request(named("b1-late", 1, B, late), late)] == ["b1-late"]


def test_buffers_expire_and_executed_ids_are_bounded():
    lead = Leadership(peer_timeout_s=1.0, buffer_s=2.0, capacity=10)
    lead.heard(A, 0.0)
    for i in range(3):
        lead.request(req(i, B, 0.0), 0.0)
    lead.heard(A, 2.5), lead.heard(B, 2.5)
    lead.tick(2.5)
    assert lead.counts.expired == 3 and not lead.buffers.get(B)
    for i in range(100, 130):
        lead.request(req(i, A, 3.0), 3.0)
    assert len(lead.executed) == 10


def test_action_message_parsing():
    message = {"pe": "n1", "inc": "i1", "reqs": [{"id": "a", "ds": "ds", "action": "go", "args": [1]},
                                                   {"id": "b", "ds": "ds", "action": "go", "direct": True}]}
    reqs = requests_of(message, now=5.0)
    assert [(r.id, r.pe, r.args, r.direct, r.received) for r in reqs] == [
        ("a", ("n1", "i1"), [1], False, 5.0), ("b", ("n1", "i1"), [], True, 5.0)]
    for bad in ({"inc": "i1", "reqs": []}, {"pe": "n1", "inc": "i1", "reqs": {"id": "a"}},
                {"pe": "n1", "inc": "i1", "reqs": [{"ds": "ds", "action": "go"}]},
                {"pe": "n1", "inc": "i1", "reqs": ["not an object"]}):
        with pytest.raises(ValueError, match="malformed action message"):
            requests_of(bad, now=0.0)


def test_heartbeats_keep_their_cadence_when_each_publish_is_slow(redis_server):
    """A beat whose publish waits (a busy Redis) does not push the next one back: the beats are heartbeat_s
    apart on average, not heartbeat_s plus the wait."""
    async def go():
        listener, beating = Probe(redis_server, "l"), Probe(redis_server, "b")
        heard: list[float] = []

        async def on_message(channel, data):
            if data.get("node") == "b":
                heard.append(time.monotonic())
        listener.bus.on_message = on_message
        listener.bus.subscribe = [listener.bus.channels.heartbeat]
        publish = beating.bus.publish

        async def slow_publish(channel, payload):
            await asyncio.sleep(0.035)
            return await publish(channel, payload)
        beating.bus.publish = slow_publish
        tl = listener.start()
        await until(lambda: listener.bus.connected)
        tb = beating.start()
        await until(lambda: len(heard) >= 21)
        await beating.stop(tb)
        await listener.stop(tl)
        return heard
    heard = run(go())
    mean_gap = (heard[20] - heard[0]) / 20
    assert 0.045 < mean_gap < 0.075, mean_gap   # heartbeat_s 0.05; a fixed pause after each: 0.085 and more
