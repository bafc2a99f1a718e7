"""Row storage: one Table per base, policy or execute table, hash indexes on column sets, and Delta.

Keys of an index on columns `cols`: the value itself for one column, a tuple for several. A lookup on every
column of a table goes to `Table.rows` (row -> derivation count; 1 for base rows) instead.

While a table's delta is being propagated, plans read the table in its *old* state; a rule that reads the
same table again (self-join) sees the *new* state at the occurrences before the one being differentiated,
through the `*_new` helpers of the Delta. Only then is the delta applied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from operator import itemgetter
from typing import Any

Row = tuple
Cols = tuple[int, ...]

EMPTY: tuple = ()


class Index:
    __slots__ = ("cols", "key", "buckets", "refs")

    def __init__(self, cols: Cols):
        self.cols = cols
        self.key: Callable[[Row], Any] = itemgetter(*cols)
        self.buckets: dict[Any, set[Row]] = {}
        self.refs = 0

    def add(self, rows: Iterable[Row]) -> None:
        buckets, key = self.buckets, self.key
        for row in rows:
            k = key(row)
            bucket = buckets.get(k)
            if bucket is None:
                buckets[k] = {row}
            else:
                bucket.add(row)

    def remove(self, rows: Iterable[Row]) -> None:
        buckets, key = self.buckets, self.key
        for row in rows:
            k = key(row)
            bucket = buckets[k]
            bucket.discard(row)
            if not bucket:
                del buckets[k]


class Table:
    """kind: "base" (datasource rows), "derived" (a policy table) or "execute" (an action table)."""

    __slots__ = ("key", "kind", "arity", "rows", "indexes", "pending", "cur", "pos_triggers",
                 "neg_triggers", "refs", "rank", "dirty")

    def __init__(self, key: str, kind: str, arity: int):
        self.key = key
        self.kind = kind
        self.arity = arity
        self.rows: dict[Row, int] = {}
        self.indexes: dict[Cols, Index] = {}
        self.pending: dict[Row, int] = {}        # derivation-count changes not yet settled
        self.cur: Delta | None = None            # the delta being propagated
        self.pos_triggers: list[Any] = []        # plans to run on a change of this table
        self.neg_triggers: list[Any] = []        # plans for `not` literals on this table
        self.refs = 0                            # rule literals (heads and bodies) naming this table
        self.rank = 0
        self.dirty = False

    def acquire_index(self, cols: Cols) -> Index:
        index = self.indexes.get(cols)
        if index is None:
            index = self.indexes[cols] = Index(cols)
            index.add(self.rows)
        index.refs += 1
        return index

    def release_index(self, cols: Cols) -> None:
        index = self.indexes[cols]
        index.refs -= 1
        if index.refs == 0:
            del self.indexes[cols]

    def apply(self, delta: Delta) -> None:
        rows = self.rows
        for index in self.indexes.values():
            if delta.removed:
                index.remove(delta.removed)
            if delta.added:
                index.add(delta.added)
        for row in delta.removed:
            del rows[row]
        if delta.counts is None:
            rows.update(dict.fromkeys(delta.added, 1))
        else:
            rows.update(zip(delta.added, delta.counts))

    def settle(self) -> Delta | None:
        """Fold pending derivation counts into the table's counts; the rows that appear or vanish."""
        rows = self.rows
        added, counts, removed = [], [], []
        for row, change in self.pending.items():
            if not change:
                continue
            old = rows.get(row, 0)
            new = old + change
            if new < 0:
                raise AssertionError(f"negative derivation count for {self.key}{row}")
            if not old:
                added.append(row)
                counts.append(new)
            elif not new:
                removed.append(row)
            else:
                rows[row] = new
        self.pending.clear()
        if not added and not removed:
            return None
        return Delta(added, removed, counts)


class Delta:
    """Rows that appeared in (`added`) and vanished from (`removed`) one table, against its current state."""

    __slots__ = ("added", "removed", "counts", "_removed_set", "_added_set", "_by_cols", "_changes")

    def __init__(self, added: list[Row], removed: list[Row], counts: list[int] | None = None):
        self.added = added
        self.removed = removed
        self.counts = counts
        self._removed_set: set[Row] | None = None
        self._added_set: set[Row] | None = None
        self._by_cols: dict[Cols, tuple[dict, dict]] = {}
        self._changes: dict[Cols | None, tuple[list, list]] = {}

    def removed_set(self) -> set[Row]:
        if self._removed_set is None:
            self._removed_set = set(self.removed)
        return self._removed_set

    def added_set(self) -> set[Row]:
        if self._added_set is None:
            self._added_set = set(self.added)
        return self._added_set

    def grouped(self, index: Index) -> tuple[dict[Any, list[Row]], dict[Any, list[Row]]]:
        """Added and removed rows grouped by the index's key."""
        got = self._by_cols.get(index.cols)
        if got is None:
            got = self._by_cols[index.cols] = (_group(self.added, index.key), _group(self.removed, index.key))
        return got

    def key_changes(self, table: Table, cols: Cols | None) -> tuple[list, list]:
        """Keys of `cols` whose presence in the table changes: (appeared, vanished); `cols` None means all
        columns, whose keys are the rows themselves."""
        got = self._changes.get(cols)
        if got is None:
            got = self._changes[cols] = self._key_changes(table, cols)
        return got

    def _key_changes(self, table: Table, cols: Cols | None) -> tuple[list, list]:
        if cols is None:
            return self.added, self.removed
        index = table.indexes[cols]
        added, removed = self.grouped(index)
        appeared, vanished = [], []
        for k in added.keys() | removed.keys():
            old = len(index.buckets.get(k, EMPTY))
            new = old + len(added.get(k, EMPTY)) - len(removed.get(k, EMPTY))
            if new and not old:
                appeared.append(k)
            elif old and not new:
                vanished.append(k)
        return appeared, vanished

    def contains_new(self, rows: dict[Row, int], row: Row) -> bool:
        return (row in rows and row not in self.removed_set()) or row in self.added_set()

    def lookup_new(self, index: Index, k: Any) -> list[Row]:
        removed = self.removed_set()
        found = [r for r in index.buckets.get(k, EMPTY) if r not in removed]
        return found + self.grouped(index)[0].get(k, [])

    def exists_new(self, index: Index, k: Any) -> bool:
        added, removed = self.grouped(index)
        return len(index.buckets.get(k, EMPTY)) - len(removed.get(k, EMPTY)) + len(added.get(k, EMPTY)) > 0

    def scan_new(self, rows: dict[Row, int]) -> list[Row]:
        removed = self.removed_set()
        return [r for r in rows if r not in removed] + self.added


def _group(rows: list[Row], key: Callable[[Row], Any]) -> dict[Any, list[Row]]:
    groups: dict[Any, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups
