"""The policy engine's API: policies, rules, datasources, data, queries, errors, actions and time."""

from __future__ import annotations

import datetime as dt
import random
import uuid

import pytest

from congressctl.errors import PolicyError
from congressctl.policy import Action, Engine, Result
from congressctl.policy.parser import parse_program

SERVERS = ["id", "name", "status"]


@pytest.fixture
def engine() -> Engine:
    e = Engine()
    e.create_policy("p")
    return e


def kind_of(call, *args) -> str:
    with pytest.raises(PolicyError) as err:
        call(*args)
    return err.value.kind


# -- policies and rules ----------------------------------------------------------------------------------

def test_policies_are_unique_and_listed(engine):
    engine.create_policy("alpha")
    assert engine.policies() == ["alpha", "p"]
    assert kind_of(engine.create_policy, "p") == "exists"
    assert kind_of(engine.delete_policy, "nope") == "not-found"
    assert kind_of(engine.create_policy, "bad name") == "invalid"
    assert kind_of(engine.create_policy, "builtin") == "invalid"


def test_rule_ids_text_and_order(engine):
    first, _ = engine.add_rule("p", "q(x):-ds:a(x),!ds:b(x);")
    assert str(uuid.UUID(first)) == first
    second, _ = engine.add_rule("p", "r(x) :- q(x)", rule_id="mine")
    assert second == "mine"
    assert engine.rules("p") == [(first, "q(x) :- ds:a(x), not ds:b(x)"), ("mine", "r(x) :- q(x)")]
    assert engine.tables("p") == ["q", "r"]
    assert kind_of(engine.add_rule, "p", "s(1)", "mine") == "exists"
    assert kind_of(engine.delete_rule, "p", "unknown") == "not-found"
    assert kind_of(engine.add_rule, "nope", "s(1)") == "not-found"
    assert kind_of(engine.rules, "nope") == "not-found"


def test_check_rule_changes_nothing(engine):
    engine.check_rule("p", "v(x) :- ds:a(x, y), not w(y)")
    assert engine.rules("p") == []
    assert engine.update({"ds:a": ([(1, 2, 3)], [])}).deltas == {}   # arity not fixed by the check
    assert kind_of(engine.check_rule, "p", "v(x) :- q(y)") == "safety"
    assert kind_of(engine.check_rule, "p", 42) == "invalid"


def test_errors_name_rule_position_and_token(engine):
    text = "good(x) :- ds:a(x),\n   not ds:b(x, yy)"
    with pytest.raises(PolicyError) as err:
        engine.add_rule("p", text)
    e = err.value
    assert (e.kind, e.position, e.rule) == ("safety", text.index("yy"), text)
    assert (e.line, e.column) == (2, 16)
    assert "at 2:16" in e.message and "'yy'" in e.message and "good(x) :- ds:a(x)" in e.message


def test_adding_and_deleting_rules_updates_at_once(engine):
    engine.update({"ds:a": ([(1,), (2,)], [])})
    rid, result = engine.add_rule("p", "v(x) :- ds:a(x)")
    assert result.deltas == {"p:v": ({(1,), (2,)}, set())}
    assert engine.rows("p:v") == {(1,), (2,)}
    assert engine.delete_rule("p", rid).deltas == {"p:v": (set(), {(1,), (2,)})}
    assert engine.rows("p:v") == set()
    assert engine.tables("p") == []


def test_delete_policy_retracts_rows_and_keeps_readers(engine):
    engine.create_policy("q")
    engine.add_rule("q", "t(x) :- ds:a(x)")
    engine.add_rule("p", "u(x) :- q:t(x)")
    engine.update({"ds:a": ([(1,)], [])})
    result = engine.delete_policy("q")
    assert result.deltas == {"q:t": (set(), {(1,)}), "p:u": (set(), {(1,)})}
    assert engine.policies() == ["p"]
    assert engine.rules("p") == [(engine.rules("p")[0][0], "u(x) :- q:t(x)")]
    engine.create_policy("q")
    assert engine.add_rule("q", "t(x) :- ds:a(x)")[1].deltas == {"q:t": ({(1,)}, set()), "p:u": ({(1,)}, set())}


def test_rule_may_name_a_policy_before_it_exists(engine):
    engine.add_rule("p", "v(x) :- later:t(x)")
    engine.create_policy("later")
    engine.update({"ds:a": ([(3,)], [])})
    _, result = engine.add_rule("later", "t(x) :- ds:a(x)")
    assert result.deltas == {"later:t": ({(3,)}, set()), "p:v": ({(3,)}, set())}
    assert kind_of(engine.update, {"later:t": ([(4,)], [])}) == "invalid"


def test_datasource_and_policy_names_do_not_mix(engine):
    engine.update({"nova:servers": ([("s1", "a", "ACTIVE")], [])})
    assert kind_of(engine.create_policy, "nova") == "exists"
    assert kind_of(engine.declare_table, "p", "t", ["a"]) == "exists"
    assert kind_of(engine.update, {"p:t": ([(1,)], [])}) == "invalid"


# -- datasources and data ----------------------------------------------------------------------------

def test_declare_table_and_named_columns(engine):
    assert engine.declare_table("nova", "servers", SERVERS).deltas == {}
    assert engine.declare_table("nova", "servers", SERVERS).deltas == {}
    engine.add_rule("p", 'err(vm) :- nova:servers(id=vm, status="ERROR")')
    result = engine.update({"nova:servers": ([("s1", "a", "ERROR"), ("s2", "b", "ACTIVE")], [])})
    assert result.deltas == {"p:err": ({("s1",)}, set())}
    assert kind_of(engine.declare_table, "nova", "servers", ["id", "status"]) == "schema"
    assert kind_of(engine.declare_table, "nova", "servers", ["id", "id", "x"]) == "invalid"


def test_redeclaring_an_unused_table(engine):
    engine.declare_table("ds", "t", ["a", "b"])
    engine.update({"ds:t": ([(1, 2)], [])})
    engine.declare_table("ds", "t", ["x", "y"])
    assert engine.rows("ds:t") == {(1, 2)}
    engine.declare_table("ds", "t", ["x"])
    assert engine.rows("ds:t") == set()
    engine.add_rule("p", "v(x) :- ds:t(x=x)")


def test_first_declaration_must_fit_positional_use(engine):
    engine.add_rule("p", "v(x) :- ds:t(x, y)")
    assert kind_of(engine.declare_table, "ds", "t", ["a"]) == "schema"
    engine.declare_table("ds", "t", ["a", "b"])
    engine.add_rule("p", "w(x) :- ds:t(b=x)")


def test_drop_datasource(engine):
    engine.declare_table("nova", "servers", SERVERS)
    engine.add_rule("p", "v(x) :- nova:servers(id=x)")
    engine.update({"nova:servers": ([("s1", "a", "ACTIVE")], [])})
    assert engine.drop_datasource("nova").deltas == {"p:v": (set(), {("s1",)})}
    assert engine.rows("nova:servers") == set()
    assert kind_of(engine.add_rule, "p", "w(x) :- nova:servers(id=x)") == "schema"
    engine.update({"nova:servers": ([("s2", "b", "ACTIVE")], [])})
    assert engine.rows("p:v") == {("s2",)}
    assert kind_of(engine.drop_datasource, "nothing") == "not-found"


def test_update_is_atomic_and_checks_rows(engine):
    engine.declare_table("ds", "t", ["a", "b"])
    engine.add_rule("p", "v(x) :- ds:u(x)")
    bad = {"ds:u": ([(1,)], []), "ds:t": ([(1, 2, 3)], [])}
    assert kind_of(engine.update, bad) == "arity"
    assert engine.rows("ds:u") == set() and engine.rows("p:v") == set()
    assert kind_of(engine.update, {"nocolon": ([(1,)], [])}) == "invalid"
    assert kind_of(engine.update, {"ds:u": (["ab"], [])}) == "invalid"
    assert kind_of(engine.update, {"ds:w": ([(1,), (1, 2)], [])}) == "arity"


def test_rows_may_be_lists_and_repeat(engine):
    engine.add_rule("p", "v(x, y) :- ds:t(x, y)")
    result = engine.update({"ds:t": ([[1, "a"], [1, "a"], (2, "b")], [])})
    assert result.deltas == {"p:v": ({(1, "a"), (2, "b")}, set())}


def test_replace_table(engine):
    engine.add_rule("p", "v(x) :- ds:t(x)")
    engine.update({"ds:t": ([(1,), (2,)], [])})
    assert engine.replace_table("ds:t", [(2,), (3,)]).deltas == {"p:v": ({(3,)}, {(1,)})}
    assert engine.replace_table("ds:t", [(2,), (3,)]).deltas == {}
    assert engine.replace_table("ds:t", []).deltas == {"p:v": (set(), {(2,), (3,)})}
    assert kind_of(engine.replace_table, "p:v", []) == "invalid"


def test_rows_of_unknown_tables(engine):
    assert engine.rows("p:nothing") == set()
    assert kind_of(engine.rows, "nowhere:t") == "not-found"


# -- queries -----------------------------------------------------------------------------------------

def test_query_patterns_and_errors(engine):
    engine.add_rule("p", "v(x, y) :- ds:e(x, y)")
    engine.update({"ds:e": ([(1, "a"), (1, "b"), (2, "a"), (3, 3)], [])})
    assert engine.query("v(1, y)", "p") == [(1, "a"), (1, "b")]
    assert engine.query("p:v(x, \"a\")") == [(1, "a"), (2, "a")]
    assert engine.query("v(x, x)", "p") == [(3, 3)]
    assert kind_of(engine.query, "v(1, y)") == "invalid"
    assert kind_of(engine.query, "v(1, y)", "nope") == "not-found"
    assert kind_of(engine.query, "v(1)", "p") == "arity"
    assert kind_of(engine.query, "v(1, ", "p") == "syntax"
    assert kind_of(engine.query, "builtin:lt(1, 2)", "p") == "invalid"


def test_query_follows_changes(engine):
    assert engine.query("v(1, y)", "p") == []
    engine.add_rule("p", "v(x, y) :- ds:e(x, y)")
    engine.update({"ds:e": ([(1, 2)], [])})
    assert engine.query("v(1, y)", "p") == [(1, 2)]
    engine.update({"ds:e": ([(1, 3)], [(1, 2)])})
    assert engine.query("v(1, y)", "p") == [(1, 3)]


def test_query_sorts_mixed_values(engine):
    engine.update({"ds:m": ([("b",), (2,), ("a",), (1.5,)], [])})
    assert engine.query("ds:m(x)") == [(1.5,), (2,), ("a",), ("b",)]


# -- actions and time --------------------------------------------------------------------------------

def test_actions_sorted_deduplicated_and_readable(engine):
    engine.create_policy("other")
    engine.add_rule("p", "execute[nova:servers.pause(x)] :- ds:bad(x)")
    engine.add_rule("other", "execute[nova:servers.pause(x)] :- ds:bad(x)")
    engine.add_rule("p", 'execute[ops:page(x, "now")] :- ds:bad(x)')
    result = engine.update({"ds:bad": ([("vm2",), ("vm1",)], [])})
    assert result.actions == [Action("nova", "servers.pause", ("vm1",)), Action("nova", "servers.pause", ("vm2",)),
                              Action("ops", "page", ("vm1", "now")), Action("ops", "page", ("vm2", "now"))]
    assert result.deltas == {}
    assert engine.rows("execute[nova:servers.pause]") == {("vm1",), ("vm2",)}
    assert engine.tables("p") == []
    with pytest.raises(AttributeError):
        result.actions[0].name = "x"


def test_tick_moves_now():
    clock = [dt.datetime(2016, 6, 1, 12, 0, 0)]
    engine = Engine(clock=lambda: clock[0])
    engine.create_policy("p")
    _, result = engine.add_rule("p", "stamp(t) :- builtin:now(t)")
    assert result.deltas == {"p:stamp": ({("2016-06-01 12:00:00",)}, set())}
    clock[0] += dt.timedelta(minutes=1)
    assert engine.rows("p:stamp") == {("2016-06-01 12:00:00",)}
    assert engine.tick().deltas == {"p:stamp": ({("2016-06-01 12:01:00",)}, {("2016-06-01 12:00:00",)})}


# -- limits and larger data ----------------------------------------------------------------------------

def test_long_bodies(engine):
    body = ", ".join(f"ds:t{i}(x{i})" for i in range(16))
    engine.add_rule("p", f"v(x0) :- {body}")
    engine.update({f"ds:t{i}": ([(i,)], []) for i in range(16)})
    assert engine.rows("p:v") == {(0,)}
    assert kind_of(engine.add_rule, "p", f"w(x0) :- {body}, ds:t16(x16)") == "invalid"


def test_result_defaults():
    assert Result() == Result({}, [])


PROGRAM = """
v(x, y) :- ds:a(x, z), ds:b(z, y), not ds:c(x)
hop(x, w) :- ds:a(x, z), ds:a(w, z), builtin:lt(x, w)
has_hop(x) :- hop(x, w)
solo(x) :- ds:a(x, z), not has_hop(x)
used(z) :- ds:a(x, z)
execute[ops:flag(z)] :- ds:b(z, y), not used(z)
"""


def _engine_with(rows: dict[str, set]) -> Engine:
    e = Engine()
    e.create_policy("p")
    e.update({t: (r, []) for t, r in rows.items()})
    for stmt in parse_program(PROGRAM):
        e.add_rule("p", stmt.source())
    return e


def test_large_batches_match_a_fresh_engine():
    """Batches of hundreds of changes to thousands of rows, incrementally, equal the same rules added to a
    fresh engine after the data (whose first evaluation is a full join, not the delta plans)."""
    rnd = random.Random(3)
    data = {"ds:a": {(x, rnd.randrange(50)) for x in range(2000)},
            "ds:b": {(z, rnd.randrange(5)) for z in range(60)},
            "ds:c": {(x,) for x in range(0, 2000, 7)}}
    engine = _engine_with(data)
    for _ in range(5):
        diffs = {}
        for table, current in data.items():
            deleted = set(rnd.sample(sorted(current), min(len(current) // 3, 150)))
            added = {(rnd.randrange(2500), rnd.randrange(60)) if table == "ds:a" else
                     (rnd.randrange(70), rnd.randrange(5)) if table == "ds:b" else (rnd.randrange(2500),)
                     for _ in range(150)}
            diffs[table] = (added, deleted)
            data[table] = (current - deleted) | added
        engine.update(diffs)
        fresh = _engine_with(data)
        for table in ("p:v", "p:hop", "p:solo", "execute[ops:flag]"):
            assert engine.rows(table) == fresh.rows(table), table


def test_normalised_text_parses_back_to_the_same_rule(engine):
    texts = ['v(x,"a\\"b\\nc", -2, 1.5e3) :- ds:t(x , y),NOT ds:u(y);',
             "w :- ds:t(1, 2) /* c */, !builtin:lt(1, 2)",
             'execute[nova:servers.pause(x)]:-ds:t(x, y),\n  builtin:concat(x, "-", z), ds:n(z)']
    engine.declare_table("nova", "servers", SERVERS)
    for text in texts:
        rule_id, _ = engine.add_rule("p", text)
        normal = dict(engine.rules("p"))[rule_id]
        again, _ = engine.add_rule("p", normal)
        assert dict(engine.rules("p"))[again] == normal
    assert dict(engine.rules("p"))[rule_id].startswith("execute[nova:servers.pause(x)] :- ds:t(x, y), builtin:concat(")
