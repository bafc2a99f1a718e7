"""Randomised differential tests: the incremental engine against a from-scratch evaluation.

Hypothesis draws a random non-recursive program over two policies (joins, self-joins, negation with bound and
free columns, named columns, comparisons and arithmetic builtins, cross-policy references, an execute[]
head), then a sequence of changes: batches of inserts and deletes, whole-table replacements, rules removed and
added back, a policy deleted and created again. After every change the engine's derived tables must equal a
naive evaluation of the same program on the same data, and the Result must report exactly the rows that
appeared and vanished, and the actions.

The oracle below shares nothing with the engine but the rule text: it enumerates bindings literal by literal.
Default run ~20-40 s; POLICY_FUZZ_EXAMPLES=20000 for a longer one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from congressctl.policy import Action, Engine

EXAMPLES = int(os.environ.get("POLICY_FUZZ_EXAMPLES", "4000"))
DOMAIN = [0, 1, 2, 3]
VARS = ["x", "y", "z", "w"]
BASE = {"ds:a": 2, "ds:b": 2, "ds:c": 1, "ds:d": 3}
D_COLUMNS = ["k", "v", "w"]
POLICIES = ["alpha", "beta"]
COMPARISONS = {"lt": lambda a, b: a < b, "lteq": lambda a, b: a <= b, "gt": lambda a, b: a > b,
               "gteq": lambda a, b: a >= b, "equal": lambda a, b: a == b}
ARITHMETIC = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "mul": lambda a, b: a * b}


@dataclass
class Lit:
    kind: str                      # "pos", "neg", "cmp", "ncmp", "arith"
    name: str                      # table key or builtin name
    args: list                     # ("v", name) | ("c", value) | None (free column)
    named: bool = False            # render ds:d with named columns


@dataclass
class GenRule:
    head: str                      # "alpha:t0" or "execute[ds:act]"
    head_args: list
    body: list[Lit]
    policy: str
    rule_id: str | None = None
    text: str = ""


@dataclass
class Program:
    tables: dict[str, int] = field(default_factory=dict)     # derived key -> arity, in dependency order
    rules: list[GenRule] = field(default_factory=list)


# -- oracle --------------------------------------------------------------------------------------------

def _match(args: list, row: tuple, binding: dict) -> dict | None:
    out = dict(binding)
    for arg, value in zip(args, row):
        if arg is None:
            continue
        if arg[0] == "c":
            if arg[1] != value:
                return None
        elif arg[1] in out:
            if out[arg[1]] != value:
                return None
        else:
            out[arg[1]] = value
    return out


def _value(arg: tuple, binding: dict):
    return arg[1] if arg[0] == "c" else binding[arg[1]]


def _eval_rule(rule: GenRule, db: dict[str, set]) -> set[tuple]:
    bindings = [{}]
    for lit in rule.body:
        if lit.kind == "pos":
            bindings = [m for b in bindings for row in db.get(lit.name, ())
                        if (m := _match(lit.args, row, b)) is not None]
    for lit in rule.body:
        if lit.kind == "arith":
            out = []
            for b in bindings:
                value = ARITHMETIC[lit.name](_value(lit.args[0], b), _value(lit.args[1], b))
                m = _match([lit.args[2]], (value,), b)
                if m is not None:
                    out.append(m)
            bindings = out
    for lit in rule.body:
        if lit.kind in ("cmp", "ncmp"):
            want = lit.kind == "cmp"
            bindings = [b for b in bindings
                        if COMPARISONS[lit.name](_value(lit.args[0], b), _value(lit.args[1], b)) == want]
        elif lit.kind == "neg":
            bindings = [b for b in bindings
                        if not any(_match(lit.args, row, b) is not None for row in db.get(lit.name, ()))]
    return {tuple(_value(a, b) for a in rule.head_args) for b in bindings}


def evaluate(program: Program, rules: list[GenRule], base: dict[str, set]) -> dict[str, set]:
    db = {k: set(v) for k, v in base.items()}
    heads = list(program.tables) + sorted({r.head for r in program.rules if r.head.startswith("execute")})
    for head in heads:
        db[head] = set().union(*(_eval_rule(r, db) for r in rules if r.head == head))
    return {h: db[h] for h in heads}


# -- generation ----------------------------------------------------------------------------------------

def _term(rnd: random.Random, pool: list[str], const_p: float = 0.15) -> tuple:
    if not pool or rnd.random() < const_p:
        return ("c", rnd.choice(DOMAIN))
    return ("v", rnd.choice(pool))


def _render_term(arg: tuple) -> str:
    return arg[1] if arg[0] == "v" else str(arg[1])


def _render_table(key: str, policy: str, rnd: random.Random) -> str:
    prefix, name = key.split(":", 1)
    return name if prefix == policy and rnd.random() < 0.5 else key


def _render_lit(lit: Lit, policy: str, rnd: random.Random) -> str:
    neg = rnd.choice(["not ", "NOT ", "!"]) if lit.kind in ("neg", "ncmp") else ""
    if lit.kind in ("cmp", "ncmp", "arith"):
        return f"{neg}builtin:{lit.name}(" + ", ".join(_render_term(a) for a in lit.args) + ")"
    if lit.named:
        inner = ", ".join(f"{c}={_render_term(a)}" for c, a in zip(D_COLUMNS, lit.args) if a is not None)
    else:
        inner = ", ".join(_render_term(a) for a in lit.args)
    return f"{neg}{_render_table(lit.name, policy, rnd)}({inner})"


def _table_literal(rnd: random.Random, kind: str, table: str, arity: int, pool: list[str], const_p: float) -> Lit:
    named = table == "ds:d" and rnd.random() < 0.5
    args = [None if named and rnd.random() < 0.4 else _term(rnd, pool, const_p) for _ in range(arity)]
    if named and all(a is None for a in args):
        args[rnd.randrange(arity)] = _term(rnd, pool, const_p)
    return Lit(kind, table, args, named)


def _draw_rule(rnd: random.Random, head: str, arity: int, policy: str, available: dict[str, int]) -> GenRule:
    tables = sorted(available)
    body = []
    for _ in range(rnd.randint(1, 3)):
        table = rnd.choice(tables)
        body.append(_table_literal(rnd, "pos", table, available[table], VARS, 0.15))
    bound = sorted({a[1] for lit in body for a in lit.args if a and a[0] == "v"})
    for i in range(rnd.randint(0, 2)):
        if not bound:
            break
        if rnd.random() < 0.5:
            out = rnd.choice(bound + [f"o{i}"])
            body.append(Lit("arith", rnd.choice(sorted(ARITHMETIC)),
                            [_term(rnd, bound), _term(rnd, bound, 0.5), ("v", out)]))
            bound = sorted(set(bound) | {out})
        else:
            body.append(Lit(rnd.choice(["cmp", "ncmp"]), rnd.choice(sorted(COMPARISONS)),
                            [_term(rnd, bound), _term(rnd, bound, 0.3)]))
    for _ in range(rnd.choice([0, 0, 1, 1, 2])):
        table = rnd.choice(tables)
        body.append(_table_literal(rnd, "neg", table, available[table], bound, 0.2))
    shown = rnd.sample(body, len(body))        # the oracle keeps `body` in the order it was drawn
    head_args = [_term(rnd, bound, 0.1) for _ in range(arity)]
    inner = "(" + ", ".join(_render_term(a) for a in head_args) + ")" if head_args else ""
    head_text = f"execute[ds:act{inner}]" if head.startswith("execute") else head.split(":", 1)[1] + inner
    sep = rnd.choice([", ", ",", " ,\n  "])
    text = head_text + " :- " + sep.join(_render_lit(lit, policy, rnd) for lit in shown)
    return GenRule(head, head_args, body, policy, text=text + rnd.choice(["", ";", "."]))


def draw_program(rnd: random.Random) -> Program:
    program = Program()
    available = dict(BASE)
    for i in range(rnd.randint(1, 4)):
        policy = rnd.choice(POLICIES)
        key, arity = f"{policy}:t{i}", rnd.randint(0, 3)
        for _ in range(rnd.randint(1, 2)):
            program.rules.append(_draw_rule(rnd, key, arity, policy, available))
        program.tables[key] = arity
        available[key] = arity
    if rnd.random() < 0.5:
        program.rules.append(_draw_rule(rnd, "execute[ds:act]", rnd.randint(1, 2), rnd.choice(POLICIES),
                                        available))
    return program


def draw_rows(rnd: random.Random, table: str, current: set, max_size: int = 6) -> set[tuple]:
    rows = {tuple(rnd.choice(DOMAIN) for _ in range(BASE[table])) for _ in range(rnd.randint(0, max_size))}
    if current and rnd.random() < 0.5:
        rows |= set(rnd.sample(sorted(current), min(len(current), rnd.randint(1, max_size))))
    return rows


# -- the test ------------------------------------------------------------------------------------------

def _derived_rows(engine: Engine, program: Program) -> dict[str, set]:
    keys = list(program.tables) + sorted({r.head for r in program.rules if r.head.startswith("execute")})
    return {k: engine.rows(k) for k in keys}


def _expected_result(before: dict[str, set], after: dict[str, set]) -> tuple[dict, list]:
    deltas, actions = {}, []
    for key in after:
        appeared, vanished = after[key] - before[key], before[key] - after[key]
        if key.startswith("execute"):
            actions += [Action("ds", "act", row) for row in appeared]
        elif appeared or vanished:
            deltas[key] = (appeared, vanished)
    return deltas, sorted(actions, key=lambda a: a.args)


def _check(engine, program, installed, base, before, result, history):
    expected = evaluate(program, installed, base)
    assert _derived_rows(engine, program) == expected, f"derived state after:\n{history}"
    deltas, actions = _expected_result(before, expected)
    assert result.deltas == deltas, f"deltas reported by the last step of:\n{history}"
    assert result.actions == actions, f"actions reported by the last step of:\n{history}"
    return expected


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**64))
def test_incremental_equals_from_scratch(seed):
    """Hypothesis draws the seed; the case is generated from it, so a failure is reproduced by its seed."""
    rnd = random.Random(seed)
    program = draw_program(rnd)
    engine = Engine()
    for policy in POLICIES:
        engine.create_policy(policy)
    engine.declare_table("ds", "d", D_COLUMNS)
    base: dict[str, set] = {t: set() for t in BASE}
    installed: list[GenRule] = []
    state = evaluate(program, installed, base)
    log = ["program:"] + [f"  {r.policy}: {r.text}" for r in program.rules]

    def check(result, step: str) -> None:
        nonlocal state
        log.append(step)
        state = _check(engine, program, installed, base, state, result, "\n".join(log))

    def add(rule: GenRule) -> None:
        rule.rule_id, result = engine.add_rule(rule.policy, rule.text)
        installed.append(rule)
        check(result, f"add {rule.text!r}")

    if rnd.random() < 0.5:
        for rule in program.rules:
            add(rule)
    for _ in range(rnd.randint(2, 7)):
        op = rnd.choice(["batch", "batch", "batch", "replace", "rule", "rule", "policy"])
        if op == "policy":
            policy = rnd.choice(POLICIES)
            installed[:] = [r for r in installed if r.policy != policy]
            result = engine.delete_policy(policy)
            engine.create_policy(policy)
            check(result, f"delete policy {policy} and create it again")
        elif op == "rule" and installed and rnd.random() < 0.5:
            rule = rnd.choice(installed)
            installed[:] = [r for r in installed if r is not rule]
            check(engine.delete_rule(rule.policy, rule.rule_id), f"delete {rule.text!r}")
        elif op == "rule":
            missing = [r for r in program.rules if all(r is not i for i in installed)]
            if missing:
                add(rnd.choice(missing))
        elif op == "replace":
            table = rnd.choice(sorted(BASE))
            rows = draw_rows(rnd, table, base[table])
            base[table] = set(rows)
            check(engine.replace_table(table, rows), f"replace {table} {rows}")
        else:
            diffs = {}
            for table in rnd.sample(sorted(BASE), rnd.randint(1, len(BASE))):
                added, deleted = draw_rows(rnd, table, base[table]), draw_rows(rnd, table, base[table])
                diffs[table] = (list(added), list(deleted))
                base[table] = (base[table] - deleted) | added
            check(engine.update(diffs), f"update {diffs}")
    for rule in program.rules:
        if all(rule is not i for i in installed):
            add(rule)
