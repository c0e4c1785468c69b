"""The stand-in's field indexes: value -> ids buckets, and the same values in sorted order.

Why one structure for equality and ranges. A MongoDB index answers both `{f: v}` and
`{f: {$gte: a}}`; the stand-in keeps one hash bucket per distinct value (equality, `$in`,
`$group` counts) and, once a range or a sort on the field is first asked for, the distinct values
of each BSON type bracket in a `SortedList` (ranges and sorts walk the values, then take their
buckets). The sorted values are built on first use and kept up to date afterwards, so an index
nobody ranges over costs nothing more than its buckets.

Semantics follow mongomock, which the stand-in must answer exactly like:

- equality is Python `==` (1, 1.0 and True are equal; a missing field equals None), so a bucket
  holds every document whose value is `==` to its key;
- ranges compare within one type bracket only (numbers, strings, ObjectIds, dates; mongomock's
  `bson_compare` with `can_compare_types=False`), and a missing field never matches;
- a sort orders by bracket (None/missing < numbers < strings < ObjectIds < booleans < dates),
  then by value, keeping natural order among equal values (a stable sort, both directions).

Values the buckets cannot represent exactly (arrays, sub-documents, NaN, ...) are "irregular":
lookups on that field then only narrow, and their candidates are checked by mongomock. Booleans
share buckets with 1 and 0, so a field holding any boolean answers no range or sort.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Collection, Iterable, Iterator
from datetime import datetime
from typing import Any

import bson
from bson import ObjectId
from sortedcontainers import SortedList

# mongomock's compare-type codes of the brackets kept sorted, in BSON sort order
NONE, NUM, STR, OID, BOOL, DATE = 5, 10, 15, 35, 40, 45
ID_BRACKETS = (NUM, STR, OID)  # the `_id` brackets the store keeps sorted
VALUE_BRACKETS = (NUM, STR, OID, DATE)  # the field-value brackets ranges and sorts answer
RANGE_OPS = ("$gt", "$gte", "$lt", "$lte")


class Irregular(Exception):
    """A document value the hash index cannot represent exactly."""


_PLAIN_TYPES = frozenset({type(None), str, int, bool, bson.Int64, ObjectId, datetime})


def plain(value: Any) -> bool:
    """A value whose Python `==` and hash agree with mongomock's equality.

    None, str, numbers (not NaN), ObjectIds and naive datetimes (mongomock stores and compares
    dates naive, in UTC, at millisecond precision; an aware one is irregular).
    """
    kind = type(value)
    if kind in _PLAIN_TYPES:
        return kind is not datetime or value.tzinfo is None
    return kind is float and value == value  # NaN never equals itself


def id_bracket(value: Any) -> int | None:
    """The sorted `_id` bracket of a value (None: kept unsorted)."""
    kind = type(value)
    if kind is str:
        return STR
    if kind is int or kind is bson.Int64 or (kind is float and value == value):
        return NUM
    if kind is ObjectId:
        return OID
    return None


def value_bracket(value: Any) -> int | None:
    """The bracket of a plain field value for ranges and sorts (booleans and None: not sorted)."""
    kind = type(value)
    if kind is datetime:
        return DATE if value.tzinfo is None else None
    return id_bracket(value)


def field_value(doc: dict[str, Any], path: str) -> Any:
    """The indexed value of `path`: missing is None; arrays and odd parents are irregular."""
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, dict):
            raise Irregular
        if part not in cur:
            return None
        cur = cur[part]
    if not plain(cur):
        raise Irregular
    return cur


class Bounds:
    """A conjunction of range bounds within one bracket (`$gt/$gte/$lt/$lte`)."""

    def __init__(self, bracket: int) -> None:
        self.bracket = bracket
        self.lo: Any = None
        self.lo_incl = True
        self.hi: Any = None
        self.hi_incl = True
        self.empty = False

    def add(self, op: str, bound: Any) -> None:
        if op in ("$gt", "$gte"):
            incl = op == "$gte"
            if self.lo is None or bound > self.lo or (bound == self.lo and not incl):
                self.lo, self.lo_incl = bound, incl
        else:
            incl = op == "$lte"
            if self.hi is None or bound < self.hi or (bound == self.hi and not incl):
                self.hi, self.hi_incl = bound, incl

    def contains(self, value: Any, bracket_of: Any = id_bracket) -> bool:
        if bracket_of(value) != self.bracket:
            return False
        if self.lo is not None and (value < self.lo or (value == self.lo and not self.lo_incl)):
            return False
        return not (self.hi is not None and (value > self.hi or (value == self.hi and not self.hi_incl)))

    def span(self, keys: list[Any] | SortedList) -> tuple[int, int]:
        """Positions [i, j) of the range within sorted `keys` (all of this bracket)."""
        if isinstance(keys, SortedList):
            left, right = keys.bisect_left, keys.bisect_right
        else:
            left, right = functools.partial(bisect.bisect_left, keys), functools.partial(bisect.bisect_right, keys)
        i = 0 if self.lo is None else (left if self.lo_incl else right)(self.lo)
        j = len(keys) if self.hi is None else (right if self.hi_incl else left)(self.hi)
        return i, max(i, j)

    def irange(self, keys: SortedList, reverse: bool = False) -> Iterator[Any]:
        return keys.irange(self.lo, self.hi, (self.lo_incl, self.hi_incl), reverse=reverse)  # type: ignore[no-any-return]


def range_bounds(value: Any, bracket_of: Any) -> Bounds | None:
    """`Bounds` of a condition made only of range operators on values of one bracket."""
    if not isinstance(value, dict) or not value or not all(op in RANGE_OPS for op in value):
        return None
    bounds: Bounds | None = None
    for op, bound in value.items():
        bracket = bracket_of(bound)
        if bracket is None:
            return None
        if bounds is None:
            bounds = Bounds(bracket)
        if bracket != bounds.bracket:
            bounds.empty = True  # mongomock compares within one bracket: nothing is in both
        else:
            bounds.add(op, bound)
    return bounds


class FieldIndex:
    """value -> ids of the documents holding it, for one field path (mongomock equality).

    A bucket is a dict with None values, not a set: CPython's garbage collector stops tracking
    a dict that holds only strings and numbers, while it walks every set on every full
    collection (measured at 1M chunks: 114 ms per full collection with sets, 40 with dicts).

    An index loaded from a checkpoint (`from_column`) builds its buckets on first use: opening
    the stand-in per operation must not pay for indexes the operation never reads. Changes made
    before that (the records replayed after the checkpoint, writes) are queued and applied
    when it is built.
    """

    _LOG_LIMIT = 100_000  # queued changes before a pending index is built anyway

    def __init__(self, path: str) -> None:
        self.path = path
        self._buckets: dict[Any, dict[Any, None]] = {}
        self._irregular: set[Any] = set()
        self._bools = 0  # documents whose value is a boolean (ranges and sorts are then refused)
        self._order: dict[int, SortedList] | None = None  # per bracket, the distinct values (lazy)
        self._pending: tuple[list[Any], dict[str, Any]] | None = None
        self._log: list[tuple[bool, Any, tuple[bool, Any]]] = []

    @classmethod
    def from_column(cls, path: str, ids: list[Any], column: dict[str, Any]) -> FieldIndex:
        """An index to build from a checkpoint column (values, sizes, members, irregular as
        positions in `ids`) when first read."""
        index = cls(path)
        index._pending = (ids, column)
        return index

    def _build(self) -> None:
        assert self._pending is not None
        ids, column = self._pending
        self._pending = None
        members = [ids[i] for i in column["members"]]
        at = 0
        for value, n in zip(column["values"], column["sizes"], strict=True):
            self._buckets[value] = dict.fromkeys(members[at : at + n])
            if type(value) is bool:
                self._bools += n
            at += n
        self._irregular = {ids[i] for i in column["irregular"]}
        log, self._log = self._log, []
        for adding, doc_id, key in log:
            (self._add if adding else self._remove)(doc_id, key)

    @property
    def buckets(self) -> dict[Any, dict[Any, None]]:
        if self._pending is not None:
            self._build()
        return self._buckets

    @property
    def irregular(self) -> set[Any]:
        if self._pending is not None:
            self._build()
        return self._irregular

    @property
    def bools(self) -> int:
        if self._pending is not None:
            self._build()
        return self._bools

    def key(self, doc: dict[str, Any]) -> tuple[bool, Any]:
        try:
            return True, field_value(doc, self.path)
        except Irregular:
            return False, None

    def add(self, doc_id: Any, key: tuple[bool, Any]) -> None:
        if self._pending is None:
            self._add(doc_id, key)
        else:
            self._queue(True, doc_id, key)

    def fill(self, doc_id: Any, stored: list[Any]) -> None:
        """`add` from a persisted key (`[value]`, or `[]` when irregular)."""
        self.add(doc_id, (True, stored[0]) if stored else (False, None))

    def remove(self, doc_id: Any, key: tuple[bool, Any]) -> None:
        if self._pending is None:
            self._remove(doc_id, key)
        else:
            self._queue(False, doc_id, key)

    def _queue(self, adding: bool, doc_id: Any, key: tuple[bool, Any]) -> None:
        self._log.append((adding, doc_id, key))
        if len(self._log) > self._LOG_LIMIT:
            self._build()

    def _add(self, doc_id: Any, key: tuple[bool, Any]) -> None:
        regular, value = key
        if not regular:
            self._irregular.add(doc_id)
            return
        bucket = self._buckets.get(value)
        if bucket is None:
            bucket = self._buckets[value] = {}
            if self._order is not None:
                self._order_add(value)
        bucket[doc_id] = None
        if type(value) is bool:
            self._bools += 1

    def _remove(self, doc_id: Any, key: tuple[bool, Any]) -> None:
        regular, value = key
        if not regular:
            self._irregular.discard(doc_id)
            return
        if type(value) is bool:
            self._bools -= 1
        bucket = self._buckets.get(value)
        if bucket is not None:
            bucket.pop(doc_id, None)
            if not bucket:
                del self._buckets[value]
                if self._order is not None:
                    self._order_remove(value)

    def lookup(self, values: Iterable[Any]) -> tuple[Collection[Any], bool]:
        """Ids whose value equals one of `values` (+ irregular ones), and whether that is exact.

        One value: the bucket itself, not a copy (read it, never change it): a unique check on
        (task, task_version, unit_id) must not copy every result of the task.
        """
        buckets, irregular = self.buckets, self.irregular
        wanted = list(dict.fromkeys(values))
        if len(wanted) == 1 and not irregular:
            return buckets.get(wanted[0], {}), True
        found: set[Any] = set()
        for value in wanted:
            bucket = buckets.get(value)
            if bucket:
                found.update(bucket)
        if irregular:
            return found | irregular, False
        return found, True

    # ----- ranges and sorts
    def sortable(self) -> bool:
        """Whether ranges and sorts can be answered from the sorted values (no booleans)."""
        return self.bools == 0

    def ordered(self, bracket: int) -> SortedList:
        """The distinct values of `bracket`, sorted (built on first use, then maintained)."""
        if self._order is None:
            by: dict[int, list[Any]] = {b: [] for b in VALUE_BRACKETS}
            for value in self.buckets:
                b = _sort_bracket(value)
                if b is not None:
                    by[b].append(_normal(value))
            self._order = {b: SortedList(values) for b, values in by.items()}
        return self._order[bracket]

    def _order_add(self, value: Any) -> None:
        assert self._order is not None
        b = _sort_bracket(value)
        if b is not None:
            self._order[b].add(_normal(value))

    def _order_remove(self, value: Any) -> None:
        assert self._order is not None
        b = _sort_bracket(value)
        if b is not None:
            self._order[b].discard(_normal(value))

    def in_range(self, bounds: Bounds, reverse: bool = False) -> Iterator[Any]:
        """Distinct values within `bounds`, in order."""
        return bounds.irange(self.ordered(bounds.bracket), reverse)

    def sorted_values(self, reverse: bool) -> Iterator[Any]:
        """Every distinct value in mongomock's sort order (None first), reversed when asked."""
        brackets = [NUM, STR, OID, DATE]
        has_none = None in self.buckets
        if reverse:
            for b in reversed(brackets):
                yield from reversed(self.ordered(b))
            if has_none:
                yield None
            return
        if has_none:
            yield None
        for b in brackets:
            yield from self.ordered(b)


class SortedIds:
    """The sorted `_id` index: per bracket (numbers, strings, ObjectIds) a `SortedList` of ids.

    Loaded from a checkpoint (`from_positions`) it is built on first use, as `FieldIndex` is:
    point lookups and counts never need it, `_id`-ordered pages do.
    """

    def __init__(self, lists: dict[int, SortedList] | None = None) -> None:
        self._lists = lists if lists is not None else {b: SortedList() for b in ID_BRACKETS}
        self._pending: tuple[list[Any], dict[int, list[int]]] | None = None
        self._log: list[tuple[bool, Any, int]] = []

    @classmethod
    def from_positions(cls, ids: list[Any], positions: dict[int, list[int]]) -> SortedIds:
        index = cls()
        index._pending = (ids, positions)
        return index

    def of(self, bracket: int) -> SortedList:
        if self._pending is not None:
            ids, positions = self._pending
            self._pending = None
            self._lists = {b: SortedList([ids[i] for i in positions.get(b, ())]) for b in ID_BRACKETS}
            log, self._log = self._log, []
            for adding, key, b in log:
                if adding:
                    self._lists[b].add(key)
                else:
                    self._lists[b].discard(key)
        return self._lists[bracket]

    def add(self, key: Any, bracket: int) -> None:
        if self._pending is None:
            self._lists[bracket].add(key)
        else:
            self._log.append((True, key, bracket))

    def discard(self, key: Any, bracket: int) -> None:
        if self._pending is None:
            self._lists[bracket].discard(key)
        else:
            self._log.append((False, key, bracket))


def _sort_bracket(value: Any) -> int | None:
    """The bracket a bucket key is sorted under (a boolean key stands for 1 or 0 once no
    boolean is left in the field: its bucket then holds only numbers)."""
    if type(value) is bool:
        return NUM
    return value_bracket(value)


def _normal(value: Any) -> Any:
    return int(value) if type(value) is bool else value


__all__ = [
    "BOOL",
    "DATE",
    "ID_BRACKETS",
    "NONE",
    "NUM",
    "OID",
    "RANGE_OPS",
    "STR",
    "VALUE_BRACKETS",
    "Bounds",
    "FieldIndex",
    "Irregular",
    "SortedIds",
    "field_value",
    "id_bracket",
    "plain",
    "range_bounds",
    "value_bracket",
]
