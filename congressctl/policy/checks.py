"""Checks made when a rule is added, and the resolved form of a rule they produce.

Order of checks (the first failure is reported): syntax (parser), execute[] placement, head form, builtins,
named columns against schemas, arity, safety, recursion. Each failure is a PolicyError whose message quotes
the offending literal or variable and gives its position.

Resolution turns every body literal into positional arguments against a table key: "policy:table" for
policy tables (unqualified names belong to the rule's policy) and "datasource:table" otherwise. A column
that a named-column literal leaves out is free (`None`): any value matches it; under `not` it is
existentially quantified ("no row with id=x").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from congressctl.policy.builtins import BUILTINS, Builtin
from congressctl.policy.syntax import Atom, Statement, Term, Var, rule_error

EXECUTE = "execute"
MAX_JOINED_LITERALS = 16     # the generated join nests one loop per literal; Python allows 20 blocks


@dataclass(frozen=True)
class Literal:
    """A resolved body literal. kind: "pos" / "neg" (table), "builtin" / "nbuiltin" (negated check)."""

    kind: str
    table: str                         # table key, or the builtin's name
    args: tuple[Term | None, ...]      # None: a free column
    pos: int
    text: str
    builtin: Builtin | None = None

    def variables(self) -> list[Var]:
        return [a for a in self.args if isinstance(a, Var)]

    def inputs(self) -> tuple[Term | None, ...]:
        """Arguments that must be bound before the literal can be evaluated."""
        if self.kind != "builtin":
            return self.args
        assert self.builtin is not None   # builtin_literal() gives every builtin literal its Builtin
        return self.args[:self.builtin.inputs]


@dataclass(frozen=True)
class Rule:
    """A checked rule: head table key (policy table or "execute[ds:action]") and resolved body."""

    policy: str
    text: str                          # normalised text
    head: str
    head_args: tuple[Term, ...]
    body: tuple[Literal, ...]
    action: tuple[str, str] | None = None    # (datasource, action) of an execute[] head
    tables: tuple[tuple[str, str, int], ...] = ()   # (key, kind, arity) of the head and every body table

    @property
    def uses_now(self) -> bool:
        return any(lit.table == "now" and lit.builtin is not None for lit in self.body)

    def body_tables(self) -> set[str]:
        return {lit.table for lit in self.body if lit.kind in ("pos", "neg")}


class Names(Protocol):
    """What the checks need to know about the engine's current names."""

    def is_policy(self, name: str) -> bool: ...

    def columns(self, datasource: str, table: str) -> tuple[str, ...] | None: ...

    def table_kind_arity(self, key: str) -> tuple[str, int] | None: ...

    def consumers(self, key: str) -> Iterable[str]: ...


def execute_key(datasource: str, action: str) -> str:
    return f"{EXECUTE}[{datasource}:{action}]"


def is_policy_table(prefix: str, key: str, names: Names) -> bool:
    """A prefix names a policy table when it is a policy, or when the table is already known as one."""
    if names.is_policy(prefix):
        return True
    known = names.table_kind_arity(key)
    return known is not None and known[0] == "derived"


class _RuleChecker:
    def __init__(self, stmt: Statement, policy: str, names: Names):
        self.stmt = stmt
        self.text = stmt.text
        self.policy = policy
        self.names = names
        self.arity: dict[str, tuple[int, str]] = {}

    def fail(self, kind: str, pos: int, what: str) -> Exception:
        return rule_error(kind, self.text, pos, what)

    def quote(self, atom: Atom) -> str:
        return repr(self.text[atom.pos:atom.end])

    def check(self) -> Rule:
        stmt = self.stmt
        for atom in stmt.body:
            if atom.modal == EXECUTE:
                raise self.fail("execute-in-body", atom.pos,
                                f"execute[] is allowed only as a rule head, not in the body: {self.quote(atom)}")
            if atom.modal is not None:
                raise self.fail("invalid", atom.pos, f"unknown modal {atom.modal!r} in {self.quote(atom)}")
        head, head_args, action = self.head(stmt.head)
        body = tuple(self.literal(atom) for atom in stmt.body)
        joined = sum(1 for lit in body if lit.kind == "pos")
        if joined > MAX_JOINED_LITERALS:
            raise self.fail("invalid", stmt.body[0].pos,
                            f"at most {MAX_JOINED_LITERALS} positive table literals per rule, found {joined}")
        self.safety(stmt.head, head_args, body)
        tables = tuple((key, kind, arity) for key, (arity, kind) in self.arity.items())
        rule = Rule(self.policy, str(stmt), head, head_args, body, action, tables)
        self.recursion(rule)
        return rule

    def head(self, atom: Atom) -> tuple[str, tuple[Term, ...], tuple[str, str] | None]:
        if atom.negated:
            raise self.fail("invalid", atom.pos, f"a rule head cannot be negated: {self.quote(atom)}")
        if atom.modal not in (None, EXECUTE):
            raise self.fail("invalid", atom.pos, f"unknown modal {atom.modal!r} in {self.quote(atom)}")
        named = [p for p in atom.params if p.column is not None]
        if named:
            raise self.fail("schema", named[0].pos,
                            f"a rule head takes positional arguments only, not {str(named[0])!r}")
        args = tuple(p.term for p in atom.params)
        if atom.modal == EXECUTE:
            if atom.prefix is None or atom.prefix == "builtin" or self.names.is_policy(atom.prefix):
                raise self.fail("invalid", atom.pos,
                                f"execute[] needs a datasource action such as nova:servers.pause, "
                                f"not {self.quote(atom)}")
            key = execute_key(atom.prefix, atom.name)
            self.fix_arity(key, len(args), atom, "execute")
            return key, args, (atom.prefix, atom.name)
        if atom.prefix not in (None, self.policy):
            raise self.fail("invalid", atom.pos,
                            f"a rule head must be a table of policy {self.policy!r}, not {self.quote(atom)}")
        key = f"{self.policy}:{atom.name}"
        self.fix_arity(key, len(args), atom, "derived")
        return key, args, None

    def literal(self, atom: Atom) -> Literal:
        if atom.prefix == "builtin":
            return self.builtin_literal(atom)
        quoted = self.text[atom.pos:atom.end]
        if atom.prefix is None or is_policy_table(atom.prefix, f"{atom.prefix}:{atom.name}", self.names):
            key = f"{atom.prefix or self.policy}:{atom.name}"
            args = self.positional(atom, key, None)
            self.fix_arity(key, len(args), atom, "derived")
        else:
            key = f"{atom.prefix}:{atom.name}"
            args = self.positional(atom, key, self.names.columns(atom.prefix, atom.name))
            self.fix_arity(key, len(args), atom, "base")
        return Literal("neg" if atom.negated else "pos", key, args, atom.pos, quoted)

    def builtin_literal(self, atom: Atom) -> Literal:
        builtin = BUILTINS.get(atom.name)
        quoted = self.text[atom.pos:atom.end]
        if builtin is None:
            raise self.fail("unknown-builtin", atom.pos, f"unknown builtin {atom.table!r} in {quoted!r}")
        named = [p for p in atom.params if p.column is not None]
        if named:
            raise self.fail("invalid", named[0].pos, f"builtins take positional arguments only: {quoted!r}")
        if len(atom.params) != builtin.arity:
            raise self.fail("arity", atom.pos, f"{quoted!r} has {len(atom.params)} arguments but "
                                               f"{atom.table} takes {builtin.arity}")
        if atom.negated and builtin.outputs:
            raise self.fail("invalid", atom.pos, f"only checks (builtins without outputs) can be negated: {quoted!r}")
        kind = "nbuiltin" if atom.negated else "builtin"
        return Literal(kind, builtin.name, tuple(p.term for p in atom.params), atom.pos, quoted, builtin)

    def positional(self, atom: Atom, key: str, columns: tuple[str, ...] | None) -> tuple[Term | None, ...]:
        """Arguments by position; named columns are looked up in the datasource's declared schema."""
        if all(p.column is None for p in atom.params):
            if columns is not None and len(atom.params) != len(columns):
                raise self.fail("arity", atom.pos, f"{self.quote(atom)} has {len(atom.params)} arguments but "
                                                   f"{key} has {len(columns)} columns {list(columns)}")
            return tuple(p.term for p in atom.params)
        if columns is None:
            raise self.fail("schema", atom.pos, f"{self.quote(atom)} names columns but {key} has no declared "
                                                "schema (use positional arguments or declare the table)")
        args: list[Term | None] = [None] * len(columns)
        given = [False] * len(columns)
        for i, param in enumerate(atom.params):
            index = i if param.column is None else self.column_index(param.column, columns, key, param.pos)
            if index >= len(columns):
                raise self.fail("arity", param.pos, f"{self.quote(atom)} has more arguments than the "
                                                    f"{len(columns)} columns of {key}")
            if given[index]:
                raise self.fail("schema", param.pos, f"column {columns[index]!r} of {key} is given twice in "
                                                     f"{self.quote(atom)}")
            given[index] = True
            args[index] = param.term
        return tuple(args)

    def column_index(self, column: str | int, columns: tuple[str, ...], key: str, pos: int) -> int:
        if isinstance(column, int):
            if column < len(columns):
                return column
            raise self.fail("unknown-column", pos, f"column number {column} is out of range: {key} has "
                                                   f"{len(columns)} columns")
        if column in columns:
            return columns.index(column)
        raise self.fail("unknown-column", pos, f"unknown column {column!r} of {key}; its columns are "
                                               f"{list(columns)}")

    def fix_arity(self, key: str, arity: int, atom: Atom, kind: str) -> None:
        known = self.names.table_kind_arity(key)
        if known is not None and known[0] != kind:
            raise self.fail("invalid", atom.pos, f"{self.quote(atom)} refers to {key}, which is a {known[0]} "
                                                 f"table here")
        expected = known[1] if known is not None else None
        first = self.arity.setdefault(key, (arity, kind))
        if expected is None:
            expected = first[0]
        if arity != expected:
            raise self.fail("arity", atom.pos, f"{self.quote(atom)} has {arity} arguments but {key} has "
                                               f"arity {expected}")

    def safety(self, head: Atom, head_args: tuple[Term, ...], body: tuple[Literal, ...]) -> None:
        bound = {v.name for lit in body if lit.kind == "pos" for v in lit.variables()}
        pending = [lit for lit in body if lit.kind in ("builtin", "nbuiltin")]
        progress = True
        while pending and progress:
            progress = False
            for lit in list(pending):
                inputs = lit.inputs()
                if all(not isinstance(a, Var) or a.name in bound for a in inputs):
                    bound.update(a.name for a in lit.args if isinstance(a, Var))
                    pending.remove(lit)
                    progress = True
        for lit in pending:
            inputs = lit.inputs()
            var = next(a for a in inputs if isinstance(a, Var) and a.name not in bound)
            raise self.fail("safety", var.pos, f"unsafe variable {var.name!r} in {lit.text!r}: a builtin's "
                                               "inputs must be bound by positive literals")
        for lit in body:
            if lit.kind == "neg":
                for var in lit.variables():
                    if var.name not in bound:
                        raise self.fail("safety", var.pos, f"unsafe variable {var.name!r} in {lit.text!r}: a "
                                                           "variable under 'not' must appear in a positive literal")
        for term in head_args:
            if isinstance(term, Var) and term.name not in bound:
                raise self.fail("safety", term.pos, f"unsafe variable {term.name!r} in the head "
                                                    f"{self.quote(head)}: it must appear in a positive literal")

    def recursion(self, rule: Rule) -> None:
        body = {lit.table: lit for lit in rule.body if lit.kind in ("pos", "neg")}
        if rule.head in body:
            lit = body[rule.head]
            raise self.fail("recursion", lit.pos, f"recursion: {lit.text!r} refers to the rule's own head "
                                                  f"{rule.head}")
        path = _path_to_any(rule.head, set(body), self.names)
        if path:
            lit = body[path[-1]]
            cycle = " -> ".join([path[-1]] + path)
            raise self.fail("recursion", lit.pos, f"recursion through {lit.text!r}: {cycle}")


def _path_to_any(start: str, targets: set[str], names: Names) -> list[str] | None:
    """A chain of tables from `start` to one of `targets`, following "is used by a rule defining" edges."""
    parents: dict[str, str | None] = {start: None}
    stack = [start]
    while stack:
        table = stack.pop()
        for user in names.consumers(table):
            if user in parents:
                continue
            parents[user] = table
            if user in targets:
                path = [user]
                while (parent := parents[path[-1]]) is not None:
                    path.append(parent)
                return path[::-1]
            stack.append(user)
    return None


def check_statement(stmt: Statement, policy: str, names: Names) -> Rule:
    """All checks on one parsed statement of `policy`; raises PolicyError, changes nothing."""
    return _RuleChecker(stmt, policy, names).check()


def resolve_pattern(text: str, atom: Atom, policy: str | None, names: Names) -> Literal:
    """A query pattern as a positive literal: its table key and positional arguments (None = free)."""
    checker = _RuleChecker(Statement(atom, (), text, 0, len(text)), policy or "", names)
    if atom.prefix == "builtin":
        raise checker.fail("invalid", atom.pos, f"cannot query a builtin: {checker.quote(atom)}")
    return checker.literal(atom)


def resolve_body(stmt: Statement, policy: str, names: Names) -> tuple[Literal, ...]:
    """The body literals of a statement resolved as in a rule of `policy` (names, columns, builtins), without
    the checks on its head; for the rules of an action policy, whose heads are updates (t+, t-)."""
    checker = _RuleChecker(stmt, policy, names)
    body = tuple(checker.literal(atom) for atom in stmt.body)
    checker.safety(stmt.head, tuple(p.term for p in stmt.head.params), body)
    return body
