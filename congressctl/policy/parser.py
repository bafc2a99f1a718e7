"""Lexer and recursive-descent parser for Congress Datalog.

    statement := literal [":-" literal ("," literal)*] [";" | "."]
    literal   := ["not" | "NOT" | "!"] (ID "[" atom "]" | atom)
    atom      := ID [":" ID] ["+" | "-"] ["(" [param ("," param)*] ")"]     +/-: updates only
    param     := term | (ID | INT) "=" term           positional params come first
    term      := INT | FLOAT | STRING | ID             a bare ID is a variable

Identifiers may contain dots (`nova:servers.pause`); a dot that is not followed by an identifier character
ends the statement instead. Comments: `//`, `#` (to end of line) and `/* ... */`.
Update literals `t+(...)` (insert) and `t-(...)` (delete) are read only where `updates` is allowed: in the
rules of an action policy and in a simulate sequence; elsewhere they are a syntax error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from congressctl.errors import PolicyError
from congressctl.policy.syntax import Atom, Const, Param, Statement, Term, Var, rule_error

_TOKEN = re.compile(r"""
    (?P<skip>\s+|//[^\n]*|\#[^\n]*|/\*.*?\*/)
  | (?P<open_comment>/\*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<open_string>["'])
  | (?P<op>:-)
  | (?P<float>-?(?:\d+\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+))
  | (?P<int>-?\d+)
  | (?P<id>[A-Za-z_](?:[A-Za-z0-9_]|\.(?=[A-Za-z0-9_]))*)
  | (?P<punct>[()\[\],=:;.!+-])
""", re.VERBOSE | re.DOTALL)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}
_NEGATIONS = ("not", "NOT")


@dataclass(frozen=True)
class Token:
    kind: str     # "id", "int", "float", "string", "eof" or the punctuation itself (":-", "(", ...)
    text: str
    pos: int


def tokenize(text: str) -> list[Token]:
    tokens = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise rule_error("syntax", text, pos, f"unexpected character {text[pos]!r}")
        kind = m.lastgroup
        assert kind is not None   # every alternative of _TOKEN is a named group
        if kind == "open_comment":
            raise rule_error("syntax", text, pos, "unterminated comment '/*'")
        if kind == "open_string":
            raise rule_error("syntax", text, pos, "unterminated string")
        if kind in ("op", "punct"):
            tokens.append(Token(m.group(), m.group(), pos))
        elif kind != "skip":
            tokens.append(Token(kind, m.group(), pos))
        pos = m.end()
    tokens.append(Token("eof", "", len(text)))
    return tokens


def _unquote(token: str) -> str:
    body = token[1:-1]
    if "\\" not in body:
        return body
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), body)


class _Parser:
    def __init__(self, text: str, updates: bool = False):
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.updates = updates

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def peek(self, ahead: int = 1) -> Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def error(self, what: str, token: Token | None = None) -> PolicyError:
        token = token or self.tok
        found = "end of text" if token.kind == "eof" else repr(token.text)
        return rule_error("syntax", self.text, token.pos, f"{what}, found {found}")

    def take(self, kind: str, what: str) -> Token:
        if self.tok.kind != kind:
            raise self.error(f"expected {what}")
        token = self.tok
        self.i += 1
        return token

    def at_end(self) -> bool:
        return self.tok.kind == "eof"

    def statement(self) -> Statement:
        start = self.tok.pos
        head = self.literal()
        body: list[Atom] = []
        if self.tok.kind == ",":
            raise self.error("a rule has exactly one head literal; expected ':-'")
        if self.tok.kind == ":-":
            self.i += 1
            body.append(self.literal())
            while self.tok.kind == ",":
                self.i += 1
                body.append(self.literal())
        end = self.tokens[self.i - 1].pos + len(self.tokens[self.i - 1].text)
        if self.tok.kind in (";", "."):
            self.i += 1
        elif self.tok.kind not in ("eof", "id", "!"):
            raise self.error("expected ',', ':-' or the end of the statement")
        return Statement(head, tuple(body), self.text, start, end)

    def literal(self) -> Atom:
        start = self.tok.pos
        negated = False
        if self.tok.kind == "!" or (self.tok.kind == "id" and self.tok.text in _NEGATIONS
                                    and self.peek().kind == "id"):
            negated = True
            self.i += 1
        if self.tok.kind == "id" and self.peek().kind == "[":
            modal = self.take("id", "a modal").text
            self.i += 1
            atom = self.atom()
            self.take("]", "']'")
            return Atom(atom.prefix, atom.name, atom.params, negated, modal, start, self.tokens[self.i - 1].pos + 1,
                        atom.update)
        atom = self.atom()
        return Atom(atom.prefix, atom.name, atom.params, negated, None, start, atom.end, atom.update)

    def atom(self) -> Atom:
        first = self.take("id", "a table name")
        prefix, name = None, first.text
        if self.tok.kind == ":":
            self.i += 1
            prefix, name = name, self.take("id", "a table name after ':'").text
            if self.tok.kind == ":":
                raise self.error("a table name has at most one ':'")
        update = None
        if self.tok.kind in ("+", "-"):
            if not self.updates:
                raise self.error("an update literal (t+ or t-) belongs in an action policy or a simulate "
                                 "sequence; expected '(' or the end of the literal")
            update = self.tok.kind
            self.i += 1
        params: list[Param] = []
        end = self.tokens[self.i - 1].pos + len(self.tokens[self.i - 1].text)
        if self.tok.kind == "(":
            self.i += 1
            if self.tok.kind != ")":
                params.append(self.param(params))
                while self.tok.kind == ",":
                    self.i += 1
                    params.append(self.param(params))
            end = self.take(")", "',' or ')'").pos + 1
        return Atom(prefix, name, tuple(params), pos=first.pos, end=end, update=update)

    def param(self, before: list[Param]) -> Param:
        token = self.tok
        if token.kind in ("id", "int") and self.peek().kind == "=":
            self.i += 2
            column: str | int = token.text if token.kind == "id" else int(token.text)
            return Param(self.term(), column, token.pos)
        if any(p.column is not None for p in before):
            raise self.error("a positional argument cannot follow a named one")
        return Param(self.term(), None, token.pos)

    def term(self) -> Term:
        token = self.tok
        self.i += 1
        if token.kind == "id":
            return Var(token.text, token.pos)
        if token.kind == "int":
            return Const(int(token.text), token.pos)
        if token.kind == "float":
            return Const(float(token.text), token.pos)
        if token.kind == "string":
            return Const(_unquote(token.text), token.pos)
        self.i -= 1
        raise self.error("expected a variable or a constant")


def parse_program(text: str, updates: bool = False) -> list[Statement]:
    """Every statement of `text`, in order; each keeps offsets into the whole text."""
    parser = _Parser(text, updates)
    statements = []
    while not parser.at_end():
        statements.append(parser.statement())
    return statements


def parse_statement(text: str, updates: bool = False) -> Statement:
    """Exactly one statement (rule or fact)."""
    parser = _Parser(text, updates)
    if parser.at_end():
        raise parser.error("expected a rule")
    statement = parser.statement()
    if not parser.at_end():
        raise parser.error("expected ',' or the end of the rule (one statement per call)")
    return statement


def parse_literal(text: str) -> Atom:
    """A query pattern: one atom, e.g. `v(5, y)` or `nova:servers(id=x)`; no negation, no modal."""
    parser = _Parser(text)
    atom = parser.atom()
    if not parser.at_end():
        raise parser.error("expected the end of the pattern")
    return atom
