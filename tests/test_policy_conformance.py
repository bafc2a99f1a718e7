"""Table-driven conformance cases for the policy language (tests/policy_cases.yaml).

A case is either accepted or rejected:

  name:      what it shows
  schemas:   {datasource: {table: [columns]}}
  policies:  {policy: program text}          statements added one by one, in order
  data:      {"ds:table": [rows]}
  clock:     "2016-06-01 12:00:00"           what builtin:now reads
  queries:   [{query: pattern, in: policy, expect: [rows]}]    rows in the engine's sorted order
  steps:     [{update: {"ds:t": [added, deleted]} | replace: ["ds:t", rows] | add_rule: [policy, text]
               | delete_rule: [policy, statement index] | delete_policy: p | create_policy: p | tick: time,
               deltas: {"policy:table": [appeared, vanished]}, actions: [[ds, action, args]], queries: [...]}]
  reject:    {policy: p, rule: text, kind: error kind, at: offending text | position: offset, quote: text}
  trace:     [{query, in, expect: [rows], text: exact trace | has: [lines]}]      (topdown.py)
  simulate:  [{in, query, sequence, action_policy?, delta?, expect: [answers]}]    (simulate.py)
  action_policies: {policy: [rules]}   action policies (created, their rules given to simulate only)

Accepted cases run twice: data loaded before the rules and after them; both must answer the same.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from congressctl.errors import PolicyError
from congressctl.policy import Action, Engine
from congressctl.policy.parser import parse_program
from congressctl.policy.simulate import simulate
from congressctl.policy.syntax import line_col
from congressctl.policy.topdown import trace_query

CASES = yaml.safe_load((Path(__file__).parent / "policy_cases.yaml").read_text())
ACCEPTED = [c for c in CASES if "reject" not in c]
REJECTED = [c for c in CASES if "reject" in c]


class Clock:
    def __init__(self, at: str):
        self.at = dt.datetime.fromisoformat(at)

    def __call__(self) -> dt.datetime:
        return self.at


def rows(value: list) -> set[tuple]:
    return {tuple(r) for r in value}


def build(case: dict, data_first: bool) -> tuple[Engine, Clock, dict[str, list[str]]]:
    clock = Clock(case.get("clock", "2016-06-01 00:00:00"))
    engine = Engine(clock=clock)
    for ds, tables in case.get("schemas", {}).items():
        for table, columns in tables.items():
            engine.declare_table(ds, table, columns)
    data = {table: (rows(r), []) for table, r in case.get("data", {}).items()}
    if data_first and data:
        engine.update(data)
    ids: dict[str, list[str]] = {}
    for policy in case.get("action_policies", {}):
        engine.create_policy(policy)
    for policy, text in case.get("policies", {}).items():
        engine.create_policy(policy)
        ids[policy] = [engine.add_rule(policy, stmt.source())[0] for stmt in parse_program(text)]
    if not data_first and data:
        engine.update(data)
    return engine, clock, ids


def check_queries(engine: Engine, queries: list[dict], where: str) -> None:
    for q in queries:
        got = engine.query(q["query"], q.get("in"))
        assert got == [tuple(r) for r in q["expect"]], f"{where}: {q['query']}"


def run_step(engine: Engine, clock: Clock, ids: dict[str, list[str]], step: dict):
    if "update" in step:
        return engine.update({t: (rows(a), rows(d)) for t, (a, d) in step["update"].items()})
    if "replace" in step:
        table, new_rows = step["replace"]
        return engine.replace_table(table, rows(new_rows))
    if "add_rule" in step:
        policy, text = step["add_rule"]
        rule_id, result = engine.add_rule(policy, text)
        ids.setdefault(policy, []).append(rule_id)
        return result
    if "delete_rule" in step:
        policy, index = step["delete_rule"]
        return engine.delete_rule(policy, ids[policy][index])
    if "delete_policy" in step:
        return engine.delete_policy(step["delete_policy"])
    if "create_policy" in step:
        engine.create_policy(step["create_policy"])
        return None
    if "tick" in step:
        clock.at = dt.datetime.fromisoformat(step["tick"])
        return engine.tick()
    raise AssertionError(f"unknown step {step}")


def test_enough_cases_and_every_error_kind():
    assert len(CASES) >= 60
    kinds = {c["reject"]["kind"] for c in REJECTED}
    assert kinds >= {"syntax", "safety", "arity", "schema", "unknown-column", "unknown-builtin", "recursion",
                     "execute-in-body", "invalid"}
    assert len({c["name"] for c in CASES}) == len(CASES), "case names must be unique"


@pytest.mark.parametrize("data_first", [True, False], ids=["data-first", "rules-first"])
@pytest.mark.parametrize("case", ACCEPTED, ids=[c["name"] for c in ACCEPTED])
def test_accepted(case: dict, data_first: bool):
    engine, clock, ids = build(case, data_first)
    check_queries(engine, case.get("queries", []), "after loading")
    for n, step in enumerate(case.get("steps", [])):
        result = run_step(engine, clock, ids, step)
        where = f"step {n} {step}"
        if "deltas" in step:
            expected = {t: (rows(a), rows(v)) for t, (a, v) in step["deltas"].items()}
            assert result.deltas == expected, where
        if "actions" in step:
            assert result.actions == [Action(ds, name, tuple(args)) for ds, name, args in step["actions"]], where
        check_queries(engine, step.get("queries", []), where)


@pytest.mark.parametrize("case", REJECTED, ids=[c["name"] for c in REJECTED])
def test_rejected(case: dict):
    engine, _, _ = build(case, data_first=True)
    reject = case["reject"]
    policy, text = reject["policy"], reject["rule"]
    if policy not in engine.policies():
        engine.create_policy(policy)
    before = engine.rules(policy)
    expected_pos = reject["position"] if "position" in reject else text.index(reject["at"])
    with pytest.raises(PolicyError) as checked:
        engine.check_rule(policy, text)
    with pytest.raises(PolicyError) as added:
        engine.add_rule(policy, text)
    for err in (checked.value, added.value):
        assert (err.kind, err.position) == (reject["kind"], expected_pos), err.message
        line, col = line_col(text, expected_pos)
        assert f"at {line}:{col}" in err.message
        assert err.rule == text
        if "quote" in reject:
            assert reject["quote"] in err.message
    assert engine.rules(policy) == before


TRACED = [c for c in CASES if "trace" in c]
SIMULATED = [c for c in CASES if "simulate" in c]


def test_trace_and_simulate_cases_exist():
    assert len(TRACED) >= 2 and len(SIMULATED) >= 5


@pytest.mark.parametrize("case", TRACED, ids=[c["name"] for c in TRACED])
def test_trace(case: dict):
    engine, _, _ = build(case, data_first=True)
    for t in case["trace"]:
        rows, text = trace_query(engine, t["query"], t["in"])
        assert rows == [tuple(r) for r in t["expect"]], t["query"]
        if "text" in t:
            assert text == t["text"], text
        for line in t.get("has", []):
            assert line in text.splitlines(), f"{line!r} not in:\n{text}"


@pytest.mark.parametrize("data_first", [True, False], ids=["data-first", "rules-first"])
@pytest.mark.parametrize("case", SIMULATED, ids=[c["name"] for c in SIMULATED])
def test_simulate(case: dict, data_first: bool):
    engine, _, _ = build(case, data_first)
    actions = case.get("action_policies", {})
    for s in case["simulate"]:
        action_policy = s.get("action_policy")
        answers, trace = simulate(engine, policy=s["in"], query=s["query"], sequence=s["sequence"],
                                  action_policy=action_policy, action_rules=actions.get(action_policy, []),
                                  delta=s.get("delta", False), trace=True)
        assert answers == s["expect"], f"{s['query']} after {s['sequence']!r}\n{trace}"
        check_queries(engine, case.get("queries", []), f"after simulating {s['sequence']!r}")
