"""Syntax tree of Congress Datalog statements, and their canonical text.

Every node keeps `pos`, its character offset in the text it was parsed from, so each check can point at
the offending token. Offsets take no part in equality.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from congressctl.errors import PolicyError

Value = int | float | str


@dataclass(frozen=True)
class Var:
    name: str
    pos: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Const:
    value: Value
    pos: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return render_value(self.value)


Term = Var | Const


@dataclass(frozen=True)
class Param:
    """One argument of an atom: positional (`column is None`) or named, `id=x` / `0=x`."""

    term: Term
    column: str | int | None = None
    pos: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return str(self.term) if self.column is None else f"{self.column}={self.term}"


@dataclass(frozen=True)
class Atom:
    """A literal: `[not] [modal[]prefix:name[+|-](params)[]]`; `end` is the offset just past it; `update` is
    "+" or "-" for an update literal (action policies and simulate sequences only)."""

    prefix: str | None
    name: str
    params: tuple[Param, ...] = ()
    negated: bool = False
    modal: str | None = None
    pos: int = field(default=0, compare=False)
    end: int = field(default=0, compare=False)
    update: str | None = None

    @property
    def table(self) -> str:
        return f"{self.prefix}:{self.name}" if self.prefix else self.name

    def __str__(self) -> str:
        inner = self.table + (self.update or "")
        if self.params:
            inner += "(" + ", ".join(str(p) for p in self.params) + ")"
        if self.modal:
            inner = f"{self.modal}[{inner}]"
        return f"not {inner}" if self.negated else inner


@dataclass(frozen=True)
class Statement:
    """A rule `head :- body` or a fact (empty body); `text` is the whole text it was parsed from."""

    head: Atom
    body: tuple[Atom, ...]
    text: str
    start: int = 0
    end: int = 0

    def source(self) -> str:
        return self.text[self.start:self.end]

    def __str__(self) -> str:
        if not self.body:
            return str(self.head)
        return f"{self.head} :- " + ", ".join(str(a) for a in self.body)


def render_value(value: Value) -> str:
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return '"' + escaped.replace("\t", "\\t").replace("\r", "\\r") + '"'
    return repr(value)


def line_col(text: str, pos: int) -> tuple[int, int]:
    """1-based line and column of offset `pos` in `text`."""
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def rule_error(kind: str, text: str, pos: int, what: str) -> PolicyError:
    """A PolicyError naming the rule text and the position (line:col and offset) of the offending part."""
    line, col = line_col(text, pos)
    shown = " ".join(text.split())
    return PolicyError(f"{what} at {line}:{col} (offset {pos}) in rule: {shown}", rule=text, position=pos,
                       kind=kind, line=line, column=col)
