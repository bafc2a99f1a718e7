"""The policy engine: named policies of rules over datasource tables, maintained incrementally."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from heapq import heappop, heappush
from typing import Any

from congressctl.errors import PolicyError
from congressctl.policy.builtins import format_datetime
from congressctl.policy.checks import EXECUTE, Literal, Rule, check_statement, resolve_pattern
from congressctl.policy.compiler import CompiledRule, compile_rule
from congressctl.policy.parser import parse_literal, parse_statement
from congressctl.policy.store import Cols, Delta, Row, Table
from congressctl.policy.syntax import Const, Var

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*\Z")     # what the rule lexer reads as an ID
_QUERY_CACHE_SIZE = 1024


@dataclass(frozen=True)
class Action:
    datasource: str
    name: str
    args: tuple


@dataclass
class Result:
    """What one change did: derived rows that appeared/vanished per "policy:table", and the actions to run."""

    deltas: dict[str, tuple[set[tuple], set[tuple]]] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)


def _value_key(value: Any) -> tuple[int, Any]:
    if type(value) in (int, float):
        return 0, value
    if type(value) is str:
        return 1, value
    return 2, repr(value)


def row_sort_key(row: tuple) -> tuple:
    """Orders rows mixing numbers and strings deterministically (numbers first)."""
    return tuple(_value_key(v) for v in row)


def _action_sort_key(action: Action) -> tuple:
    return action.datasource, action.name, row_sort_key(action.args)


def _rows(rows: Iterable[Any], what: str) -> list[Row]:
    out = []
    for row in rows:
        if type(row) is not tuple:
            if isinstance(row, (str, bytes, dict)) or not isinstance(row, Iterable):
                raise PolicyError(f"{what}: a row must be a tuple of values, not {row!r}", kind="invalid")
            row = tuple(row)
        out.append(row)
    return out


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name in ("builtin", EXECUTE):
        raise PolicyError(f"invalid {what} name {name!r}: it must be an identifier such as servers or "
                          "servers.addresses", kind="invalid")
    return name


@dataclass
class _Query:
    version: int
    table: Table | None
    cols: Cols
    key: Any
    same: list[tuple[int, int]]      # positions that must hold equal values (a repeated variable)

    def run(self) -> list[tuple]:
        table = self.table
        if table is None:
            return []
        if len(self.cols) == table.arity:
            rows: Iterable[Row] = [self.key] if self.key in table.rows else []
        elif self.cols:
            rows = table.indexes[self.cols].buckets.get(self.key, ())
        else:
            rows = table.rows
        if self.same:
            rows = [r for r in rows if all(r[a] == r[b] for a, b in self.same)]
        return sorted(rows, key=row_sort_key)


class Engine:
    """Several named policies over datasource tables; every derived table is kept up to date as base rows
    and rules change. Not thread-safe: one caller at a time."""

    def __init__(self, clock: Callable[[], dt.datetime] | None = None):
        self._clock = clock or dt.datetime.now
        self._now = format_datetime(self._clock())
        self._policies: dict[str, dict[str, CompiledRule]] = {}
        self._schemas: dict[str, dict[str, tuple[str, ...]]] = {}
        self._tables: dict[str, Table] = {}
        self._consumers: dict[str, Counter[str]] = {}     # table -> heads of the rules that read it
        self._version = 0                                   # bumped on every change of names or rules
        self._queries: dict[tuple[str, str | None], _Query] = {}
        self._query_indexes: set[tuple[str, Cols]] = set()
        self._names = _Names(self)

    # -- policies and rules -----------------------------------------------------------------------------

    def create_policy(self, name: str) -> None:
        _check_name(name, "policy")
        if name in self._policies:
            raise PolicyError(f"policy {name!r} already exists", kind="exists")
        tables = self._tables_of(name)
        if name in self._schemas or any(t.kind == "base" and t.rows for t in tables):
            raise PolicyError(f"{name!r} is already in use as a datasource", kind="exists")
        for table in tables:
            table.kind = "derived"      # rules named it before it existed; it was empty and had no schema
        self._policies[name] = {}
        self._version += 1

    def delete_policy(self, name: str) -> Result:
        """Drop the policy and its rules; what they derived vanishes (reported as deletions)."""
        rules = self._policy(name)
        result = self._remove_rules(list(rules.values()))
        del self._policies[name]
        self._version += 1
        return result

    def policies(self) -> list[str]:
        return sorted(self._policies)

    def check_rule(self, policy: str, text: str) -> None:
        """Parse and check one rule as add_rule would (PolicyError on failure); changes nothing."""
        self._check(policy, text)

    def add_rule(self, policy: str, text: str, rule_id: str | None = None) -> tuple[str, Result]:
        """Check, compile and install one statement (a fact is a rule without body); derives at once."""
        rule = self._check(policy, text)
        rules = self._policies[policy]
        rule_id = str(uuid.uuid4()) if rule_id is None else rule_id
        if rule_id in rules:
            raise PolicyError(f"rule {rule_id!r} already exists in policy {policy!r}", kind="exists")
        for key, kind, arity in rule.tables:
            table = self._tables.get(key)
            if table is None:
                table = self._tables[key] = Table(key, kind, arity)
            table.refs += 1
        for key in rule.body_tables():
            self._consumers.setdefault(key, Counter())[rule.head] += 1
        self._raise_rank(rule)
        compiled = compile_rule(rule, self._tables, self._current_time)
        for trigger in compiled.triggers:
            (trigger.table.neg_triggers if trigger.negated else trigger.table.pos_triggers).append(trigger)
        rules[rule_id] = compiled
        self._version += 1
        compiled.full(1)
        return rule_id, self._run([], [compiled.head])

    def delete_rule(self, policy: str, rule_id: str) -> Result:
        rules = self._policy(policy)
        if rule_id not in rules:
            raise PolicyError(f"no rule {rule_id!r} in policy {policy!r}", kind="not-found")
        result = self._remove_rules([rules.pop(rule_id)])
        self._version += 1
        return result

    def rules(self, policy: str) -> list[tuple[str, str]]:
        return [(rule_id, c.rule.text) for rule_id, c in self._policy(policy).items()]

    def tables(self, policy: str) -> list[str]:
        """Names (without prefix) of the tables the policy's rule heads define, execute[] excluded."""
        rules = self._policy(policy).values()
        return sorted({c.rule.head.split(":", 1)[1] for c in rules if c.rule.action is None})

    # -- datasources and data ---------------------------------------------------------------------------

    def declare_table(self, datasource: str, table: str, columns: list[str]) -> Result:
        """Declare a datasource table's columns. Changing them is refused while rules read the table; an
        unread table with a new arity loses its rows."""
        _check_name(datasource, "datasource")
        _check_name(table, "table")
        cols = tuple(columns)
        if not all(isinstance(c, str) and _NAME.match(c) for c in cols) or len(set(cols)) != len(cols):
            raise PolicyError(f"invalid columns {list(cols)!r} for {datasource}:{table}: names must be "
                              "distinct identifiers", kind="invalid")
        if datasource in self._policies or any(t.kind != "base" for t in self._tables_of(datasource)):
            raise PolicyError(f"{datasource!r} is a policy, not a datasource", kind="exists")
        key = f"{datasource}:{table}"
        old = self._schemas.get(datasource, {}).get(table)
        if old == cols:
            return Result()
        current = self._tables.get(key)
        if current is not None and current.refs and (old is not None or current.arity != len(cols)):
            raise PolicyError(f"cannot change the columns of {key} from {list(old or ())!r} to {list(cols)!r}: "
                              "rules use it", kind="schema")
        if current is not None and current.arity != len(cols):
            self._drop_table(current)      # no rule reads it, so its old rows go without a trace
            current = None
        if current is None:
            self._tables[key] = Table(key, "base", len(cols))
        self._schemas.setdefault(datasource, {})[table] = cols
        self._version += 1
        return Result()

    def drop_datasource(self, datasource: str) -> Result:
        """Forget the datasource's schema and rows; rules reading it stay and see empty tables."""
        tables = [t for t in self._tables_of(datasource) if t.kind == "base"]
        if not tables and datasource not in self._schemas:
            raise PolicyError(f"no datasource {datasource!r}", kind="not-found")
        result = self._run([(t, Delta([], list(t.rows))) for t in tables if t.rows])
        self._schemas.pop(datasource, None)
        for table in tables:
            if not table.refs:
                self._drop_table(table)
        self._version += 1
        return result

    def update(self, diffs: dict[str, tuple[Iterable[tuple], Iterable[tuple]]]) -> Result:
        """Apply rows (added, deleted) to base tables "ds:table"; deletions count before additions, so a
        row in both ends up present. Re-adding a present row or deleting an absent one changes nothing."""
        prepared = []
        for key, (added, deleted) in diffs.items():
            add, delete = _rows(added, key), _rows(deleted, key)
            arity = self._arity_for(key, add or delete)
            if arity is not None:
                self._check_rows(key, arity, add)
                self._check_rows(key, arity, delete)
                prepared.append((key, arity, add, delete))
        changes = []
        for key, arity, add, delete in prepared:
            table = self._base_table(key, arity)
            rows = table.rows
            incoming = dict.fromkeys(add)
            removed = [r for r in dict.fromkeys(delete) if r in rows and r not in incoming]
            appeared = [r for r in incoming if r not in rows]
            if appeared or removed:
                changes.append((table, Delta(appeared, removed)))
        return self._run(changes)

    def replace_table(self, table: str, rows: Iterable[tuple]) -> Result:
        new_rows = _rows(rows, table)
        arity = self._arity_for(table, new_rows)
        current = self._tables.get(table)
        if arity is None:
            if current is None or not current.rows:
                return Result()
            arity = current.arity
        self._check_rows(table, arity, new_rows)
        target = self._base_table(table, arity)
        incoming = dict.fromkeys(new_rows)
        removed = [r for r in target.rows if r not in incoming]
        appeared = [r for r in incoming if r not in target.rows]
        if not appeared and not removed:
            return Result()
        return self._run([(target, Delta(appeared, removed))])

    def tick(self) -> Result:
        """Advance builtin:now to the clock's current time and re-derive the rules that use it."""
        timed = [c for rules in self._policies.values() for c in rules.values() if c.rule.uses_now]
        for compiled in timed:
            compiled.full(-1)
        self._now = format_datetime(self._clock())
        for compiled in timed:
            compiled.full(1)
        return self._run([], [c.head for c in timed])

    # -- reading ----------------------------------------------------------------------------------------

    def rows(self, table: str) -> set[tuple]:
        """All rows of "policy:table", "ds:table" or "execute[ds:action]"."""
        found = self._tables.get(table)
        if found is not None:
            return set(found.rows)
        prefix = table.split(":", 1)[0]
        if prefix in self._policies or prefix in self._schemas or table.startswith(EXECUTE + "["):
            return set()
        raise PolicyError(f"unknown table {table!r}", kind="not-found")

    def query(self, pattern: str, policy: str | None = None) -> list[tuple]:
        """Rows of a table matching `pattern`, e.g. 'v(5, y)' in `policy` or 'classification:v(5, y)'."""
        query = self._queries.get((pattern, policy))
        if query is None or query.version != self._version:
            query = self._compile_query(pattern, policy)
            if len(self._queries) >= _QUERY_CACHE_SIZE:
                self._queries.clear()
            self._queries[(pattern, policy)] = query
        return query.run()

    # -- for top-down evaluation (trace and simulate, topdown.py) --------------------------------------

    def rules_for(self, key: str) -> list[Rule]:
        """The checked rules whose head is the policy table `key` ("policy:table"), in the order added."""
        rules = self._policies.get(key.split(":", 1)[0], {})
        return [c.rule for c in rules.values() if c.rule.head == key]

    def table(self, key: str) -> Table | None:
        return self._tables.get(key)

    def readers(self, key: str) -> Iterable[str]:
        """Heads of the rules that read table `key`."""
        return self._consumers.get(key, ())

    def now(self) -> str:
        return self._now

    def actions_of(self, datasource: str) -> list[tuple[str, int]]:
        """(action, arity) of every execute[datasource:action] table the rules define."""
        start = f"{EXECUTE}[{datasource}:"
        return sorted((key[len(start):-1], t.arity) for key, t in self._tables.items() if key.startswith(start))

    def resolve_query(self, pattern: str, policy: str | None) -> Literal:
        """A query pattern as a positive literal against its table key (PolicyError when malformed)."""
        if not isinstance(pattern, str):
            raise PolicyError(f"a query is text, not {pattern!r}", kind="invalid")
        atom = parse_literal(pattern)
        if atom.prefix is None:
            if policy is None:
                raise PolicyError(f"query {pattern!r} names no policy: pass policy= or write policy:table",
                                  rule=pattern, position=atom.pos, kind="invalid")
            self._policy(policy)
        return resolve_pattern(pattern, atom, policy, self._names)

    @property
    def names(self) -> _Names:
        return self._names

    # -- internals --------------------------------------------------------------------------------------

    def _current_time(self) -> str:
        return self._now

    def _policy(self, name: str) -> dict[str, CompiledRule]:
        rules = self._policies.get(name)
        if rules is None:
            raise PolicyError(f"no policy {name!r}", kind="not-found")
        return rules

    def _check(self, policy: str, text: str) -> Rule:
        self._policy(policy)
        if not isinstance(text, str):
            raise PolicyError(f"a rule must be text, not {text!r}", kind="invalid")
        return check_statement(parse_statement(text), policy, self._names)

    def _declared(self, key: str) -> bool:
        datasource, _, table = key.partition(":")
        return self._names.columns(datasource, table) is not None

    def _tables_of(self, prefix: str) -> list[Table]:
        start = prefix + ":"
        return [t for key, t in self._tables.items() if key.startswith(start)]

    def _arity_for(self, key: str, sample: list[Row]) -> int | None:
        """Arity of base table `key` (refusing policy tables); None when unknown and there are no rows."""
        prefix, sep, name = key.partition(":") if isinstance(key, str) else ("", "", "")
        if not (sep and _NAME.match(prefix) and _NAME.match(name)):
            raise PolicyError(f"a base table is named 'datasource:table', not {key!r}", kind="invalid")
        table = self._tables.get(key)
        if prefix in self._policies or prefix == "builtin" or (table is not None and table.kind != "base"):
            raise PolicyError(f"{key!r} is not a datasource table; policy tables change only by rules",
                              kind="invalid")
        if table is not None:
            return table.arity
        return len(sample[0]) if sample else None

    @staticmethod
    def _check_rows(key: str, arity: int, rows: list[Row]) -> None:
        for row in rows:
            if len(row) != arity:
                raise PolicyError(f"row {row!r} of {key} has {len(row)} values but the table has {arity} "
                                  "columns", kind="arity")

    def _base_table(self, key: str, arity: int) -> Table:
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = Table(key, "base", arity)
            self._version += 1
        return table

    def _drop_table(self, table: Table) -> None:
        del self._tables[table.key]
        self._consumers.pop(table.key, None)
        self._query_indexes = {q for q in self._query_indexes if q[0] != table.key}

    def _raise_rank(self, rule: Rule) -> None:
        """Keep rank(body table) < rank(head) on every edge; ranks only grow, which stays a valid order."""
        head = self._tables[rule.head]
        needed = 1 + max((self._tables[t].rank for t in rule.body_tables()), default=0)
        stack = [(head, needed)]
        while stack:
            table, rank = stack.pop()
            if table.rank >= rank:
                continue
            table.rank = rank
            for user in self._consumers.get(table.key, ()):
                stack.append((self._tables[user], rank + 1))

    def _remove_rules(self, rules: list[CompiledRule]) -> Result:
        for compiled in rules:
            compiled.full(-1)
        for compiled in rules:
            for trigger in compiled.triggers:
                triggers = trigger.table.neg_triggers if trigger.negated else trigger.table.pos_triggers
                triggers.remove(trigger)
            compiled.release()
            for key in compiled.rule.body_tables():
                users = self._consumers[key]
                users[compiled.rule.head] -= 1
                if not users[compiled.rule.head]:
                    del users[compiled.rule.head]
        result = self._run([], [c.head for c in rules])
        for compiled in rules:
            for key, _, _ in compiled.rule.tables:
                table = self._tables[key]
                table.refs -= 1
                if not table.refs and (table.kind != "base" or not (table.rows or self._declared(key))):
                    self._drop_table(table)
        return result

    def _run(self, changes: list[tuple[Table, Delta]], touched: Iterable[Table] = ()) -> Result:
        """Propagate base-table deltas and pending derivation counts through every derived table, lowest
        rank first, so each table settles once, after all of its inputs."""
        result = Result()
        heap: list[tuple[int, int, Table]] = []
        for table in touched:
            if not table.dirty:
                table.dirty = True
                heappush(heap, (table.rank, id(table), table))
        for table, change in changes:
            self._propagate(table, change, heap)
        while heap:
            table = heappop(heap)[2]
            table.dirty = False
            delta = table.settle()
            if delta is None:
                continue
            self._propagate(table, delta, heap)
            if table.kind == "execute":
                datasource, name = table.key[len(EXECUTE) + 1:-1].split(":", 1)
                result.actions.extend(Action(datasource, name, row) for row in delta.added)
            else:
                result.deltas[table.key] = (set(delta.added), set(delta.removed))
        if len(result.actions) > 1:
            result.actions.sort(key=_action_sort_key)
        return result

    @staticmethod
    def _propagate(table: Table, delta: Delta, heap: list[tuple[int, int, Table]]) -> None:
        table.cur = delta
        added, removed = delta.added, delta.removed
        for trigger in table.pos_triggers:
            if added:
                trigger.fn(added, 1)
            if removed:
                trigger.fn(removed, -1)
            head = trigger.head
            if not head.dirty:
                head.dirty = True
                heappush(heap, (head.rank, id(head), head))
        for trigger in table.neg_triggers:
            appeared, vanished = delta.key_changes(table, trigger.cols)
            if appeared:
                trigger.fn(appeared, -1)
            if vanished:
                trigger.fn(vanished, 1)
            head = trigger.head
            if not head.dirty:
                head.dirty = True
                heappush(heap, (head.rank, id(head), head))
        table.apply(delta)
        table.cur = None

    def _compile_query(self, pattern: str, policy: str | None) -> _Query:
        lit = self.resolve_query(pattern, policy)
        table = self._tables.get(lit.table)
        cols = tuple(p for p, a in enumerate(lit.args) if isinstance(a, Const))
        values = [a.value for a in lit.args if isinstance(a, Const)]
        key = tuple(values) if table is not None and len(cols) == table.arity else (
            values[0] if len(values) == 1 else tuple(values))
        first: dict[str, int] = {}
        same = []
        for p, a in enumerate(lit.args):
            if isinstance(a, Var):
                if a.name in first:
                    same.append((first[a.name], p))
                else:
                    first[a.name] = p
        if table is not None and cols and len(cols) < table.arity and (lit.table, cols) not in self._query_indexes:
            table.acquire_index(cols)
            self._query_indexes.add((lit.table, cols))
        return _Query(self._version, table, cols, key, same)


class _Names:
    """The engine's names as the checks see them."""

    def __init__(self, engine: Engine):
        self._e = engine

    def is_policy(self, name: str) -> bool:
        return name in self._e._policies

    def columns(self, datasource: str, table: str) -> tuple[str, ...] | None:
        return self._e._schemas.get(datasource, {}).get(table)

    def table_kind_arity(self, key: str) -> tuple[str, int] | None:
        table = self._e._tables.get(key)
        return None if table is None else (table.kind, table.arity)

    def consumers(self, key: str) -> Iterable[str]:
        return self._e._consumers.get(key, ())
