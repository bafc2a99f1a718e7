"""Top-down evaluation of one query over an Engine's rules and rows: the trace, and simulate's answers.

The engine keeps every derived table up to date bottom-up; this evaluator answers a query goal by goal, as
Congress's top-down theories do, so that it can say which rules and rows produced each answer (the trace) and
answer against the engine's rows changed by an overlay of updates (simulate), leaving the engine as it was.

Overlay: {table key: (inserted rows, deleted rows)} over the engine's rows. A datasource table reads the
engine's rows minus the deleted plus the inserted; for a policy table the inserted rows are extra facts and a
deleted row takes away a fact (a rule without body) of that table, as deleting a fact from a Congress theory
does. A derived table that nothing overlaid feeds is read from the engine's own rows (unless traced).
`extra` rules (an action policy's, during simulate) define tables beside the engine's.

Trace text: one line per event, "<abbr> : " then "| " per level of nesting, then the event:
    Call: error(x)                        a goal, with the values bound so far (unbound variables by name,
                                          a free column as _)
    | Rule: error(x) :- nova:vms(x, "ERROR")       a rule whose head matches the goal is tried
    | | Call: nova:vms(x, "ERROR")                  a body literal, in the order it is evaluated
    | | Exit: nova:vms(2, "ERROR")                  each row that satisfies it
    | Exit: error(2)                                an answer of that rule
    Exit: error(2)                        each answer of the goal; "Fail: <goal>" when it has none
`not L` shows as "Call: not L" with L's own lines beneath, then "Exit: not L" (no row matched) or
"Fail: not L"; a builtin as Call/Exit/Fail of builtin:name(...). <abbr> is the abbreviation of the goal's
policy (its name's first 5 characters unless set; a datasource's name likewise), padded to 5 characters.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from congressctl.policy.builtins import NO
from congressctl.policy.checks import Literal, Rule
from congressctl.policy.engine import Engine, row_sort_key
from congressctl.policy.store import Row, Table
from congressctl.policy.syntax import Const, Term, Var, render_value

Overlay = dict[str, tuple[set[Row], set[Row]]]
Pattern = tuple   # one value per column, None where the column is not bound
_NONE: tuple[set[Row], set[Row]] = (set(), set())


def render_row(table: str, row: Iterable[Any]) -> str:
    return f"{table}({', '.join(render_value(v) for v in row)})"


def _matches(row: Row, pattern: Pattern) -> bool:
    return all(v is None or r == v for r, v in zip(row, pattern))


class TopDown:
    def __init__(self, engine: Engine, overlay: Overlay | None = None, *, trace: bool = False,
                 abbreviations: dict[str, str] | None = None, extra: dict[str, list[Rule]] | None = None):
        self.engine = engine
        self.overlay = overlay or {}
        self.tracing = trace
        self.abbreviations = abbreviations or {}
        self.extra = extra or {}
        self.lines: list[str] = []
        self.memo: dict[tuple[str, Pattern], list[Row]] = {}
        self.affected = self._affected()

    def _affected(self) -> set[str]:
        """Tables whose rows the overlay or the extra rules may change: those and every table derived from them."""
        seen: set[str] = set()
        stack = [*self.overlay, *self.extra]
        while stack:
            key = stack.pop()
            if key not in seen:
                seen.add(key)
                stack.extend(self.engine.readers(key))
        return seen

    # -- entry points ---------------------------------------------------------------------------------
    def query(self, lit: Literal) -> list[Row]:
        """Rows of the query literal's table matching its constants (and repeated variables)."""
        rows = self.goal(lit.table, lit.args, {}, 0)
        return sorted((r for r in rows if self._bind(lit.args, r, {}) is not None), key=row_sort_key)

    def rule_rows(self, rule: Rule, pattern: Pattern, depth: int) -> list[Row]:
        """Head rows of `rule` for the goal `pattern`."""
        env: dict[str, Any] = {}
        for term, value in zip(rule.head_args, pattern):
            if value is None:
                continue
            if isinstance(term, Const):
                if term.value != value:
                    return []
            elif env.setdefault(term.name, value) != value:
                return []
        out: dict[Row, None] = {}
        for found in self.body(rule.body, env, depth + 1):
            row = tuple(t.value if isinstance(t, Const) else found[t.name] for t in rule.head_args)
            if row not in out:
                out[row] = None
                if self.tracing:
                    self.line(rule.head, depth, "Exit", render_row(rule.head, row))
        return list(out)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    # -- goals ----------------------------------------------------------------------------------------
    def goal(self, key: str, args: tuple[Term | None, ...], env: dict, depth: int) -> list[Row]:
        pattern = tuple(self._value(a, env) for a in args)
        if not self.tracing:
            return self.solve(key, pattern, depth)
        shown = self._goal_text(key, args, env)
        self.line(key, depth, "Call", shown)
        rows = self.solve(key, pattern, depth + 1)
        for row in rows:
            self.line(key, depth, "Exit", render_row(key, row))
        if not rows:
            self.line(key, depth, "Fail", shown)
        return rows

    def solve(self, key: str, pattern: Pattern, depth: int) -> list[Row]:
        memo_key = (key, pattern)
        if not self.tracing and memo_key in self.memo:
            return self.memo[memo_key]
        table = self.engine.table(key)
        derived = key in self.extra or (table is not None and table.kind == "derived")
        if derived and (self.tracing or key in self.affected):
            rows = self.derive(key, pattern, depth)
        else:
            rows = self.stored(key, table, pattern)
            if self.tracing:
                rows.sort(key=row_sort_key)
        if not self.tracing:
            self.memo[memo_key] = rows
        return rows

    def stored(self, key: str, table: Table | None, pattern: Pattern) -> list[Row]:
        added, deleted = self.overlay.get(key, _NONE)
        rows = list(self._lookup(table, pattern)) if table is not None else []
        if deleted:
            rows = [r for r in rows if r not in deleted]
        if added:
            present = table.rows if table is not None else {}
            rows += [r for r in added if r not in present and _matches(r, pattern)]
        return rows

    def derive(self, key: str, pattern: Pattern, depth: int) -> list[Row]:
        added, deleted = self.overlay.get(key, _NONE)
        answers: dict[Row, None] = {}
        for rule in self.extra.get(key) or self.engine.rules_for(key):
            if not rule.body and deleted and tuple(t.value for t in rule.head_args if isinstance(t, Const)) in deleted:
                continue
            if self.tracing:
                self.line(key, depth, "Rule", rule.text)
            answers.update(dict.fromkeys(self.rule_rows(rule, pattern, depth)))
        answers.update(dict.fromkeys(r for r in added if _matches(r, pattern)))
        return sorted(answers, key=row_sort_key) if self.tracing else list(answers)

    @staticmethod
    def _lookup(table: Table, pattern: Pattern) -> Iterable[Row]:
        bound = tuple(i for i, v in enumerate(pattern) if v is not None)
        if not bound:
            return table.rows
        if len(bound) == table.arity:
            return [pattern] if pattern in table.rows else []
        index = table.indexes.get(bound)
        if index is not None:
            return index.buckets.get(pattern[bound[0]] if len(bound) == 1 else tuple(pattern[i] for i in bound), ())
        if len(bound) == 1:
            i, value = bound[0], pattern[bound[0]]
            return [r for r in table.rows if r[i] == value]
        return [r for r in table.rows if all(r[i] == pattern[i] for i in bound)]

    # -- bodies ---------------------------------------------------------------------------------------
    def body(self, lits: tuple[Literal, ...], env: dict, depth: int) -> Iterator[dict]:
        if not lits:
            yield env
            return
        i = self._pick(lits, env)
        lit, rest = lits[i], lits[:i] + lits[i + 1:]
        if lit.kind == "pos":
            for row in self.goal(lit.table, lit.args, env, depth):
                found = self._bind(lit.args, row, env)
                if found is not None:
                    yield from self.body(rest, found, depth)
        elif lit.kind == "neg":
            if self.negation(lit, env, depth):
                yield from self.body(rest, env, depth)
        else:
            for found in self.builtin(lit, env, depth):
                yield from self.body(rest, found, depth)

    def negation(self, lit: Literal, env: dict, depth: int) -> bool:
        if not self.tracing:
            return not self.goal(lit.table, lit.args, env, depth + 1)
        shown = "not " + self._goal_text(lit.table, lit.args, env)
        self.line(lit.table, depth, "Call", shown)
        holds = not self.goal(lit.table, lit.args, env, depth + 1)
        self.line(lit.table, depth, "Exit" if holds else "Fail", shown)
        return holds

    def builtin(self, lit: Literal, env: dict, depth: int) -> list[dict]:
        builtin = lit.builtin
        assert builtin is not None   # builtin literals carry their Builtin (checks.py)
        inputs = [self._value(a, env) for a in lit.args[:builtin.inputs]]
        fn = builtin.fn or self.engine.now
        value = fn(*inputs)
        shown = self._goal_text("builtin:" + lit.table, lit.args, env) if self.tracing else ""
        if not builtin.outputs:
            holds = bool(value) != (lit.kind == "nbuiltin")
            self.line("builtin", depth, "Call", ("not " if lit.kind == "nbuiltin" else "") + shown)
            self.line("builtin", depth, "Exit" if holds else "Fail", shown)
            return [env] if holds else []
        self.line("builtin", depth, "Call", shown)
        outputs = lit.args[builtin.inputs:]
        found = None if value is NO else self._bind(outputs, (value,) if len(outputs) == 1 else tuple(value), env)
        if found is None:
            self.line("builtin", depth, "Fail", shown)
            return []
        if self.tracing:
            self.line("builtin", depth, "Exit", self._goal_text("builtin:" + lit.table, lit.args, found))
        return [found]

    @staticmethod
    def _pick(lits: tuple[Literal, ...], env: dict) -> int:
        """Checks (`not`, builtins) as soon as their inputs are bound, else the positive literal with the most
        bound columns (the earliest among equals), as the engine's compiled plans order them."""
        def bound(term: Term | None) -> bool:
            return term is not None and (not isinstance(term, Var) or term.name in env)
        for i, lit in enumerate(lits):
            if lit.kind != "pos" and all(bound(a) or a is None for a in lit.inputs()):
                return i
        positive = [i for i, lit in enumerate(lits) if lit.kind == "pos"]
        return max(positive, key=lambda i: (sum(map(bound, lits[i].args)), -i)) if positive else 0

    @staticmethod
    def _value(term: Term | None, env: dict) -> Any:
        if term is None:
            return None
        return term.value if isinstance(term, Const) else env.get(term.name)

    @staticmethod
    def _bind(args: tuple[Term | None, ...], row: Row, env: dict) -> dict | None:
        found = env
        for term, value in zip(args, row):
            if term is None:
                continue
            if isinstance(term, Const):
                if term.value != value:
                    return None
            elif term.name in found:
                if found[term.name] != value:
                    return None
            else:
                if found is env:
                    found = dict(env)
                found[term.name] = value
        return found

    # -- trace text -----------------------------------------------------------------------------------
    def line(self, key: str, depth: int, event: str, what: str) -> None:
        if self.tracing:
            prefix = key.split(":", 1)[0]
            abbr = self.abbreviations.get(prefix, prefix)[:5]
            self.lines.append(f"{abbr:<5} : {'| ' * depth}{event}: {what}")

    def _goal_text(self, key: str, args: tuple[Term | None, ...], env: dict) -> str:
        parts = []
        for term in args:
            value = self._value(term, env)
            if value is not None:
                parts.append(render_value(value))
            else:
                parts.append("_" if term is None else str(term))
        return f"{key}({', '.join(parts)})"


def trace_query(engine: Engine, pattern: str, policy: str, abbreviations: dict[str, str] | None = None
                ) -> tuple[list[Row], str]:
    """The rows answering `pattern` in `policy` and the trace of their derivation (format above)."""
    lit = engine.resolve_query(pattern, policy)
    evaluator = TopDown(engine, trace=True, abbreviations=abbreviations)
    return evaluator.query(lit), evaluator.text
