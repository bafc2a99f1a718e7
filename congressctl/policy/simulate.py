"""Congress's simulate, and the rules of action policies it reads.

    answers, trace = simulate(engine, policy="p", query="error(x)", sequence='nova:vms+(4, "ERROR")',
                              action_policy="act", action_rules=[...], delta=False, trace=True)

`sequence` is a list of ground facts, each one of:
  - `ds:table+(args)` / `ds:table-(args)`: insert / delete a row of a datasource table; `t+(args)` without
    prefix updates table `t` of the simulated policy, `q:t+(args)` table `t` of policy `q` (a policy table
    takes the row as a fact);
  - `name(args)`: the action `name` of the action policy (declared there by the fact `action("name")`), which
    stands for the updates the action policy's rules derive from it: for each rule `t+(..) :- ...` or
    `t-(..) :- ...` whose body holds with the table `name` holding just (args) (and every other table as the
    sequence so far left it), that row is inserted or deleted. An action's deletions go before its insertions.
    In those rules an unprefixed table is the action policy's own (its facts, its actions); other tables are
    named with their policy or datasource (`p:ok(x)`, `nova:vms(x, s)`); an unprefixed update head `t+(..)`
    updates the simulated policy's table `t`.
Items apply in order, each to the state the ones before it left. The query is then answered on that state
(top-down, topdown.py). Nothing is changed: the updates live in an overlay that is dropped afterwards.
With `delta`, the answer is the change the sequence makes to the query's rows: `t+(row)` for each row that
appeared, then `t-(row)` for each that vanished. Answers are the query's table (as written) with each row.

Action policies (kind "action") hold such rules and `action("name")` facts; they are checked here
(`check_action_rule`) and never installed in the engine, so they derive nothing by themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from congressctl.errors import PolicyError
from congressctl.policy.checks import EXECUTE, Rule, resolve_body
from congressctl.policy.engine import Engine, row_sort_key
from congressctl.policy.parser import parse_literal, parse_program, parse_statement
from congressctl.policy.store import Row
from congressctl.policy.syntax import Atom, Const, Statement, rule_error
from congressctl.policy.topdown import Overlay, TopDown, render_row

ACTION_DECLARATION = "action"


@dataclass(frozen=True)
class _Update:
    op: str          # "+" or "-"
    key: str         # table key
    rule: Rule       # head args and body (empty for a sequence item)


def _update_key(atom: Atom, policy: str, text: str) -> str:
    if atom.prefix == "builtin" or atom.modal is not None or atom.negated:
        raise rule_error("invalid", text, atom.pos, f"cannot update {text[atom.pos:atom.end]!r}")
    return f"{atom.prefix or policy}:{atom.name}"


def check_action_rule(engine: Engine, action_policy: str, text: str) -> None:
    """Parse and check one statement of an action policy (PolicyError when malformed); changes nothing."""
    _action_statement(engine, action_policy, parse_statement(text, updates=True))


def _action_statement(engine: Engine, action_policy: str, stmt: Statement) -> Rule:
    head = stmt.head
    if head.negated or head.modal is not None:
        raise rule_error("invalid", stmt.text, head.pos, "an action policy's rule head is a table, t+ or t-, "
                                                         f"not {stmt.text[head.pos:head.end]!r}")
    if any(p.column is not None for p in head.params):
        raise rule_error("schema", stmt.text, head.pos, "a rule head takes positional arguments only")
    for atom in stmt.body:
        if atom.update is not None or atom.modal == EXECUTE:
            raise rule_error("invalid", stmt.text, atom.pos, f"{stmt.text[atom.pos:atom.end]!r} cannot be in a "
                                                             "rule body")
    body = resolve_body(stmt, action_policy, engine.names)
    key = f"{head.prefix or action_policy}:{head.name}"
    if head.update is None and head.prefix not in (None, action_policy):
        raise rule_error("invalid", stmt.text, head.pos, f"a rule head must be a table of policy "
                                                         f"{action_policy!r} or an update (t+, t-)")
    return Rule(action_policy, str(stmt), key, tuple(p.term for p in head.params), body)


@dataclass
class _ActionPolicy:
    name: str
    actions: set[str]
    tables: dict[str, list[Rule]]     # head key -> rules (facts and plain rules)
    updates: list[tuple[str, Atom, Rule]]


def _load_action_policy(engine: Engine, name: str | None, rules: list[str], policy: str) -> _ActionPolicy:
    loaded = _ActionPolicy(name or "", set(), {}, [])
    if name is None:
        return loaded
    for text in rules:
        stmt = parse_statement(text, updates=True)
        rule = _action_statement(engine, name, stmt)
        if stmt.head.update is not None:
            loaded.updates.append((stmt.head.update, stmt.head, rule))
            continue
        loaded.tables.setdefault(rule.head, []).append(rule)
        if rule.head == f"{name}:{ACTION_DECLARATION}" and not stmt.body and len(rule.head_args) == 1:
            declared = rule.head_args[0]
            if isinstance(declared, Const):
                loaded.actions.add(str(declared.value))
    return loaded


def _apply(overlay: Overlay, engine: Engine, op: str, key: str, row: Row) -> None:
    table = engine.table(key)
    if table is not None and table.kind == "execute":
        raise PolicyError(f"cannot update {key}", kind="invalid")
    if table is not None and table.arity != len(row):
        raise PolicyError(f"{render_row(key, row)} has {len(row)} values but {key} has {table.arity} columns",
                          kind="arity")
    added, deleted = overlay.setdefault(key, (set(), set()))
    (added if op == "+" else deleted).add(row)
    (deleted if op == "+" else added).discard(row)


def _ground(stmt: Statement) -> Row:
    values = []
    for param in stmt.head.params:
        if param.column is not None or not isinstance(param.term, Const):
            raise rule_error("invalid", stmt.text, param.pos, "a sequence item takes constants only, not "
                                                              f"{str(param)!r}")
        values.append(param.term.value)
    return tuple(values)


def _run_action(engine: Engine, overlay: Overlay, acts: _ActionPolicy, policy: str, name: str, row: Row,
                log: list[str]) -> None:
    act_key = f"{acts.name}:{name}"
    view = {**overlay, act_key: ({row}, set())}
    evaluator = TopDown(engine, view, extra=acts.tables)
    changes = []
    for op, head, rule in acts.updates:
        key = f"{head.prefix or policy}:{head.name}"
        for found in evaluator.rule_rows(rule, (None,) * len(rule.head_args), 0):
            changes.append((op, key, found))
    for op, key, found in sorted(changes, key=lambda c: c[0] != "-"):
        _apply(overlay, engine, op, key, found)
        log.append(f"        {render_row(key + op, found)}")


def simulate(engine: Engine, *, policy: str, query: str, sequence: str, action_policy: str | None = None,
             action_rules: list[str] | None = None, delta: bool = False, trace: bool = False,
             abbreviations: dict[str, str] | None = None) -> tuple[list[str], str | None]:
    """The query's answers after the sequence (see the module's docstring), and the trace when asked."""
    lit = engine.resolve_query(query, policy)
    shown = parse_literal(query).table
    acts = _load_action_policy(engine, action_policy, action_rules or [], policy)
    overlay: Overlay = {}
    log: list[str] = []
    for stmt in parse_program(sequence or "", updates=True):
        if stmt.body:
            raise rule_error("invalid", stmt.text, stmt.start, "a sequence holds facts (updates and actions), "
                                                               "not rules")
        row = _ground(stmt)
        head = stmt.head
        if head.update is not None:
            key = _update_key(head, policy, stmt.text)
            _apply(overlay, engine, head.update, key, row)
            log.append(f"Update: {render_row(key + head.update, row)}")
        elif head.prefix in (None, acts.name) and head.name in acts.actions:
            log.append(f"Action: {render_row(head.name, row)}")
            _run_action(engine, overlay, acts, policy, head.name, row, log)
        else:
            raise rule_error("invalid", stmt.text, head.pos, f"{stmt.text[head.pos:head.end]!r} is neither an "
                             "update (t+ or t-) nor an action declared by the action policy")
    evaluator = TopDown(engine, overlay, trace=trace, abbreviations=abbreviations)
    after = evaluator.query(lit)
    if delta:
        before = set(TopDown(engine).query(lit))
        now = set(after)
        answers = ([render_row(shown + "+", r) for r in sorted(now - before, key=row_sort_key)]
                   + [render_row(shown + "-", r) for r in sorted(before - now, key=row_sort_key)])
    else:
        answers = [render_row(shown, r) for r in after]
    return answers, ("\n".join([*log, evaluator.text]) if trace else None)
