"""Compile a checked rule into Python functions that maintain its head by counting.

For a rule `h :- L1, ..., Ln` the head's derivation count of a row is the number of body bindings that
yield it. When table T changes by delta D, the count changes by the sum over the occurrences Li of T of

    L1..L(i-1) [new state]  x  D at Li  x  L(i+1)..Ln [old state]

(with `not T` contributing the keys whose presence flips, with the opposite sign). That telescoping sum is
exact for any batch, self-joins included. Each occurrence gets one *trigger plan*; each rule also gets a
*full plan* (the whole body on the current state) used when the rule is added, removed or re-timed.

A plan is a nest of loops generated as Python source once per rule: the changed literal first, then at
each step any check whose variables are bound (`not`, builtins), else the positive literal with the most
bound columns, looked up through a hash index on exactly those columns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from congressctl.policy.builtins import NO
from congressctl.policy.checks import Literal, Rule
from congressctl.policy.store import EMPTY, Cols, Index, Table
from congressctl.policy.syntax import Const, Term, Var


@dataclass(eq=False)
class Trigger:
    """Plan run when `table` changes: rows for a positive literal, flipped keys for a `not` literal."""

    table: Table
    negated: bool
    cols: Cols | None           # key columns of a `not` literal: None = all
    fn: Callable[[Any, int], None]
    head: Table


@dataclass(eq=False)
class CompiledRule:
    rule: Rule
    head: Table
    full: Callable[[int], None]
    triggers: list[Trigger]
    indexes: list[tuple[Table, Cols]] = field(default_factory=list)
    source: str = ""

    def release(self) -> None:
        for table, cols in self.indexes:
            table.release_index(cols)
        self.indexes.clear()


def compile_rule(rule: Rule, tables: Mapping[str, Table], now: Callable[[], str]) -> CompiledRule:
    """Generate and compile every plan of `rule`; acquires the indexes the plans probe."""
    module = _Module(rule, tables, now)
    sources = [module.plan("full", None)]
    triggers = []
    for i, lit in enumerate(rule.body):
        if lit.kind in ("pos", "neg"):
            sources.append(module.plan(f"trigger_{i}", i))
            cols = module.key_cols(lit) if lit.kind == "neg" else None
            triggers.append((i, lit, cols))
    source = "\n\n".join(sources) + "\n"
    namespace = module.namespace
    code = compile(source, f"<rule {rule.policy}: {rule.text}>", "exec")
    exec(code, namespace)  # noqa: S102 - runs the plans generated above; rule values reach them through namespace
    head = tables[rule.head]
    compiled_triggers = []
    for i, lit, cols in triggers:
        table = tables[lit.table]
        if lit.kind == "neg" and cols:
            module.acquire(table, cols)     # Delta.key_changes reads this index
        compiled_triggers.append(Trigger(table, lit.kind == "neg", cols, namespace[f"trigger_{i}"], head))
    return CompiledRule(rule, head, namespace["full"], compiled_triggers, module.acquired, source)


class _Module:
    """Namespace and shared state of the generated functions of one rule."""

    def __init__(self, rule: Rule, tables: Mapping[str, Table], now: Callable[[], str]):
        self.rule = rule
        self.tables = tables
        self.now = now
        self.namespace: dict[str, Any] = {"EMPTY": EMPTY, "NO": NO, "ONE": (None,)}
        self.acquired: list[tuple[Table, Cols]] = []
        self._names: dict[int, str] = {}

    def ref(self, prefix: str, obj: Any) -> str:
        name = self._names.get(id(obj))
        if name is None:
            name = self._names[id(obj)] = f"{prefix}{len(self._names)}"
            self.namespace[name] = obj
        return name

    def const(self, value: Any) -> str:
        name = f"c{len(self.namespace)}"
        self.namespace[name] = value
        return name

    def acquire(self, table: Table, cols: Cols) -> Index:
        self.acquired.append((table, cols))
        return table.acquire_index(cols)

    @staticmethod
    def key_cols(lit: Literal) -> Cols | None:
        cols = tuple(p for p, a in enumerate(lit.args) if a is not None)
        return None if len(cols) == len(lit.args) else cols

    def plan(self, name: str, trigger: int | None) -> str:
        return _Plan(self, trigger).write(name)


class _Plan:
    def __init__(self, module: _Module, trigger: int | None):
        self.m = module
        self.rule = module.rule
        self.trigger = trigger
        self.lines: list[str] = []
        self.depth = 1
        self.bound: dict[str, str] = {}

    def emit(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)

    def open(self, line: str) -> None:
        self.emit(line)
        self.depth += 1

    def write(self, name: str) -> str:
        head = self.m.tables[self.rule.head]
        if self.trigger is None:
            self.lines.append(f"def {name}(sign):")
        else:
            self.lines.append(f"def {name}(rows, sign):")
        self.emit(f"pend = {self.m.ref('P', head.pending)}")
        self.emit("pget = pend.get")
        if self.trigger is None:
            self.open("for _ in ONE:")
        else:
            self.start(self.rule.body[self.trigger])
        for i in self.order():
            self.literal(i, self.rule.body[i])
        self.emit(f"h = {self.row_expr(self.rule.head_args)}")
        self.emit("pend[h] = pget(h, 0) + sign")
        return "\n".join(self.lines)

    # -- ordering -------------------------------------------------------------------------------------

    def is_bound(self, term: Term | None) -> bool:
        return not isinstance(term, Var) or term.name in self.bound

    def order(self) -> list[int]:
        """Body literals after the changed one: checks as soon as their variables are bound, else the
        positive literal with the most bound columns (a full match first, then the earliest)."""
        body = self.rule.body
        bound = set(self.bound)
        remaining = [i for i in range(len(body)) if i != self.trigger]
        order = []
        while remaining:
            ready = [i for i in remaining if body[i].kind != "pos" and _inputs_bound(body[i], bound)]
            pick = ready[0] if ready else max((i for i in remaining if body[i].kind == "pos"),
                                              key=lambda i: _join_score(body[i], i, bound))
            order.append(pick)
            remaining.remove(pick)
            bound.update(v.name for v in body[pick].variables())
        return order

    # -- code for each literal ------------------------------------------------------------------------

    def expr(self, term: Term | None) -> str:
        assert term is not None   # a free column is never probed, compared or passed to a builtin
        if isinstance(term, Const):
            return self.m.const(term.value)
        return self.bound[term.name]

    def row_expr(self, terms: tuple[Term | None, ...]) -> str:
        if not terms:
            return "()"
        return "(" + ", ".join(self.expr(t) for t in terms) + ",)"

    def bind(self, term: Term | None, source: str) -> None:
        """Match `source` against `term`: bind a new variable, or skip the binding when it differs."""
        if term is None:
            return
        if isinstance(term, Var) and term.name not in self.bound:
            name = self.bound[term.name] = f"v{len(self.bound)}"
            self.emit(f"{name} = {source}")
        else:
            self.emit(f"if {source} != {self.expr(term)}: continue")

    def bind_row(self, row: str, args: tuple[Term | None, ...], skip: Cols = ()) -> None:
        wanted = [(p, a) for p, a in enumerate(args) if p not in skip and a is not None]
        names = [a.name for _, a in wanted if isinstance(a, Var)]
        simple = (not skip and len(names) == len(wanted) == len(set(names))
                  and not any(n in self.bound for n in names))
        if simple and wanted:
            targets = []
            for a in args:
                if a is None:
                    targets.append("_")
                else:
                    assert isinstance(a, Var)   # simple: every column given is a new variable
                    targets.append(self.bound.setdefault(a.name, f"v{len(self.bound)}"))
            self.emit(f"{', '.join(targets)}, = {row}" if len(args) == 1 else f"{', '.join(targets)} = {row}")
            return
        for p, a in wanted:
            self.bind(a, f"{row}[{p}]")

    def start(self, lit: Literal) -> None:
        """The changed literal: rows of the delta, or (for `not`) the keys whose presence flipped."""
        if lit.kind == "pos":
            self.open("for r in rows:")
            self.bind_row("r", lit.args)
            return
        cols = self.m.key_cols(lit)
        self.open("for k in rows:")
        if cols is None:
            self.bind_row("k", lit.args)
        elif len(cols) == 1:
            self.bind(lit.args[cols[0]], "k")
        else:
            for j, p in enumerate(cols):
                self.bind(lit.args[p], f"k[{j}]")

    def literal(self, i: int, lit: Literal) -> None:
        if lit.kind in ("builtin", "nbuiltin"):
            self.builtin(i, lit)
            return
        table = self.m.tables[lit.table]
        new = self.trigger is not None and i < self.trigger and self.rule.body[self.trigger].table == lit.table
        cols = tuple(p for p, a in enumerate(lit.args) if a is not None and self.is_bound(a))
        if lit.kind == "neg":
            self.negation(table, lit, cols, new)
        else:
            self.join(i, table, lit, cols, new)

    def lookup_parts(self, table: Table, lit: Literal, cols: Cols) -> tuple[str, str, Index | None]:
        """(container expression, key expression, index) for a probe on `cols`."""
        rows = self.m.ref("R", table.rows)
        if len(cols) == len(lit.args):
            return rows, self.row_expr(lit.args), None
        if not cols:
            return rows, "()", None
        index = self.m.acquire(table, cols)
        parts = [self.expr(lit.args[p]) for p in cols]
        key = parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"
        return rows, key, index

    def join(self, i: int, table: Table, lit: Literal, cols: Cols, new: bool) -> None:
        rows, key, index = self.lookup_parts(table, lit, cols)
        cur = f"{self.m.ref('T', table)}.cur"
        row = f"r{i}"
        if len(cols) == len(lit.args):
            test = f"{cur}.contains_new({rows}, {key})" if new else f"{key} in {rows}"
            self.emit(f"if not {test}: continue")
            return
        if index is None:
            self.open(f"for {row} in {cur}.scan_new({rows}):" if new else f"for {row} in {rows}:")
        elif new:
            self.open(f"for {row} in {cur}.lookup_new({self.m.ref('I', index)}, {key}):")
        else:
            self.open(f"for {row} in {self.m.ref('B', index.buckets)}.get({key}, EMPTY):")
        self.bind_row(row, lit.args, cols)

    def negation(self, table: Table, lit: Literal, cols: Cols, new: bool) -> None:
        """`not` is checked once all its variables are bound; its free columns are never empty (a named-column
        literal names at least one), so the probe is a row or a non-empty key."""
        rows, key, index = self.lookup_parts(table, lit, cols)
        cur = f"{self.m.ref('T', table)}.cur"
        if index is None:
            test = f"{cur}.contains_new({rows}, {key})" if new else f"{key} in {rows}"
        elif new:
            test = f"{cur}.exists_new({self.m.ref('I', index)}, {key})"
        else:
            test = f"{key} in {self.m.ref('B', index.buckets)}"
        self.emit(f"if {test}: continue")

    def builtin(self, i: int, lit: Literal) -> None:
        builtin = lit.builtin
        assert builtin is not None   # builtin_literal() gives every builtin literal its Builtin
        fn = self.m.ref("F", self.m.now if builtin.fn is None else builtin.fn)
        call = f"{fn}({', '.join(self.expr(a) for a in lit.args[:builtin.inputs])})"
        if not builtin.outputs:
            self.emit(f"if {call}: continue" if lit.kind == "nbuiltin" else f"if not {call}: continue")
            return
        out = f"t{i}"
        self.emit(f"{out} = {call}")
        self.emit(f"if {out} is NO: continue")
        outputs = lit.args[builtin.inputs:]
        if len(outputs) == 1:
            self.bind(outputs[0], out)
        else:
            for j, term in enumerate(outputs):
                self.bind(term, f"{out}[{j}]")


def _inputs_bound(lit: Literal, bound: set[str]) -> bool:
    return all(not isinstance(a, Var) or a.name in bound for a in lit.inputs())


def _join_score(lit: Literal, index: int, bound: set[str]) -> tuple[bool, int, int]:
    n = sum(1 for a in lit.args if a is not None and (not isinstance(a, Var) or a.name in bound))
    return n == len(lit.args), n, -index
