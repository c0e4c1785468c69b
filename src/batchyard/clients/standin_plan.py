"""How the stand-in answers a filter from its indexes: a tree of lazy terms.

Why lazy. A change query is the targets filter (every company, or an `$or` of 1,500 company +
document clauses) AND `updated_at >= T`: the first matches the whole corpus, the second ~100
chunks. Materializing each side and intersecting costs O(corpus); instead each term first says
how many ids it could yield (`estimate`, cheap: bucket sizes), the smallest one is materialized
(`ids`) and every other term only filters those candidates (`keep`), which costs about the
candidates times the term's values, never the corpus.

A term is exact when the ids it yields are exactly the matching ones; otherwise they are a
superset and the store checks each candidate with mongomock's `filter_applies`. Filter shapes
the indexes cannot narrow return None, and the caller falls back to mongomock's scan.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from batchyard.clients.standin_index import (
    RANGE_OPS,
    Bounds,
    FieldIndex,
    id_bracket,
    plain,
    range_bounds,
    value_bracket,
)

_BIG = 1 << 62


class _Store(Protocol):
    _locs: dict[Any, int]
    _fields: dict[str, FieldIndex]

    def forward(self, key: Any, path: str) -> tuple[bool, Any]:
        """A document's key in the index of `path` (regular, value), read from the store."""
        ...


_FORWARD_COST = 32  # one candidate's forward read, in bucket probes (a pread and a small decode)


class Term:
    """What one condition says about the matching ids (see the module docstring)."""

    exact = True

    def estimate(self, cap: int) -> int:
        """An upper bound of how many ids `ids()` yields, or any number >= `cap` past it."""
        raise NotImplementedError

    def ids(self) -> Collection[Any]:
        """The candidate ids (read-only: may be an index bucket)."""
        raise NotImplementedError

    def keep(self, candidates: Collection[Any]) -> Collection[Any]:
        """The candidates this term keeps (a superset of the matches when not exact)."""
        raise NotImplementedError


def _as_set(ids: Collection[Any]) -> Any:
    """A set-like view of candidates for `&` (dict buckets give their keys view)."""
    if isinstance(ids, dict):
        return ids.keys()
    if isinstance(ids, set | frozenset):
        return ids
    return set(ids)


def _intersect(bucket: dict[Any, None], candidates: Any) -> Any:
    """bucket & candidates, iterating the smaller side (CPython's dict-view `&` does)."""
    if len(bucket) <= len(candidates):
        return {k for k in bucket if k in candidates}
    return {k for k in candidates if k in bucket}


class Equal(Term):
    """Equality / `$eq` / `$in` on a hash-indexed field."""

    def __init__(self, store: _Store, index: FieldIndex, values: list[Any]) -> None:
        self.store = store
        self.index = index
        self.wanted = list(dict.fromkeys(values))
        self.buckets = [b for b in map(index.buckets.get, self.wanted) if b]
        self.exact = not index.irregular

    def estimate(self, cap: int) -> int:
        total = len(self.index.irregular)
        for bucket in self.buckets:
            total += len(bucket)
            if total >= cap:
                break
        return total

    def ids(self) -> Collection[Any]:
        if len(self.buckets) == 1 and not self.index.irregular:
            return self.buckets[0]
        found: set[Any] = set()
        for bucket in self.buckets:
            found.update(bucket)
        return found | self.index.irregular if self.index.irregular else found

    def keep(self, candidates: Collection[Any]) -> Collection[Any]:
        view = _as_set(candidates)
        n = len(view)
        if len(self.buckets) > _FORWARD_COST and sum(min(len(b), n) for b in self.buckets) > _FORWARD_COST * n:
            # many values (a targets `$in`), few candidates: look each candidate's value up
            wanted = set(self.wanted)
            path = self.index.path
            return {k for k in view if _kept(self.store.forward(k, path), wanted.__contains__)}
        kept: set[Any] = set()
        for bucket in self.buckets:
            kept |= _intersect(bucket, view)
        if self.index.irregular:
            kept |= self.index.irregular & view
        return kept


def _kept(key: tuple[bool, Any], test: Any) -> bool:
    regular, value = key
    return not regular or bool(test(value))  # an irregular value is kept: mongomock checks it


class IdEqual(Term):
    """Equality / `$in` on `_id`."""

    def __init__(self, store: _Store, values: list[Any]) -> None:
        self.found = {v for v in values if v in store._locs}

    def estimate(self, cap: int) -> int:
        return len(self.found)

    def ids(self) -> Collection[Any]:
        return self.found

    def keep(self, candidates: Collection[Any]) -> Collection[Any]:
        view = _as_set(candidates)
        return {k for k in self.found if k in view}


class InRange(Term):
    """`$gt/$gte/$lt/$lte` on a field index, within one bracket (its sorted distinct values)."""

    def __init__(self, store: _Store, index: FieldIndex, bounds: Bounds) -> None:
        self.store = store
        self.index = index
        self.bounds = bounds
        self.exact = not index.irregular
        self._ids: set[Any] | None = None

    def _values(self) -> Any:
        return () if self.bounds.empty else self.index.in_range(self.bounds)

    def estimate(self, cap: int) -> int:
        total = len(self.index.irregular)
        buckets = self.index.buckets
        for value in self._values():
            total += len(buckets[value])
            if total >= cap:
                break
        return total

    def ids(self) -> Collection[Any]:
        if self._ids is None:
            found: set[Any] = set()
            buckets = self.index.buckets
            for value in self._values():
                found.update(buckets[value])
            self._ids = found | self.index.irregular if self.index.irregular else found
        return self._ids

    def keep(self, candidates: Collection[Any]) -> Collection[Any]:
        view = _as_set(candidates)
        wide = _FORWARD_COST * len(view) + 64
        if self._ids is None and self.estimate(wide) >= wide:
            # a wide range and few candidates: test each candidate's value instead
            bounds, path = self.bounds, self.index.path

            def inside(value: Any) -> bool:
                return not bounds.empty and bounds.contains(value, value_bracket)

            return {k for k in view if _kept(self.store.forward(k, path), inside)}
        return {k for k in self.ids() if k in view}


class AllOf(Term):
    """A conjunction: the smallest term drives, the others filter its candidates."""

    def __init__(self, terms: list[Term], exact: bool) -> None:
        self.terms = terms
        self.exact = exact and all(t.exact for t in terms)
        self._order: list[Term] | None = None

    def _ordered(self) -> list[Term]:
        if self._order is None:
            sized: list[tuple[int, int, Term]] = []
            best = _BIG
            for i, term in enumerate(self.terms):
                size = term.estimate(best)
                best = min(best, size)
                sized.append((size, i, term))
            self._order = [t for _, _, t in sorted(sized, key=lambda s: (s[0], s[1]))]
        return self._order

    def estimate(self, cap: int) -> int:
        best = cap
        for term in self.terms:
            best = min(best, term.estimate(best))
        return best

    def ids(self) -> Collection[Any]:
        first, *rest = self._ordered()
        found = first.ids()
        for term in rest:
            if not found:
                break
            found = term.keep(found)
        return found

    def keep(self, candidates: Collection[Any]) -> Collection[Any]:
        for term in self._ordered():
            if not candidates:
                break
            candidates = term.keep(candidates)
        return candidates


class AnyOf(Term):
    """A disjunction of narrowing clauses: their union.

    Many clauses that each fix one value of a common field (the targets `$or` of company +
    documents) are routed: a few candidates are each read once for that field and tested only
    against the clauses of their value, not against all of them.
    """

    def __init__(self, store: _Store, terms: list[Term]) -> None:
        self.store = store
        self.terms = terms
        self.exact = all(t.exact for t in terms)
        self._routes: tuple[str, dict[Any, list[Term]], list[Term]] | None = None
        self._routes_built = False

    def estimate(self, cap: int) -> int:
        total = 0
        for term in self.terms:
            total += term.estimate(cap - total)
            if total >= cap:
                break
        return total

    def ids(self) -> Collection[Any]:
        found: set[Any] = set()
        for term in self.terms:
            found.update(term.ids())
        return found

    def keep(self, candidates: Collection[Any]) -> Collection[Any]:
        view = _as_set(candidates)
        routes = self._route() if len(self.terms) > _FORWARD_COST and len(view) < len(self.terms) else None
        if routes is not None:
            return self._routed(view, *routes)
        kept: set[Any] = set()
        for term in self.terms:
            if len(kept) == len(view):
                break
            kept.update(term.keep(view))
        return kept

    def _routed(self, view: Any, path: str, by_value: dict[Any, list[Term]], rest: list[Term]) -> set[Any]:
        kept: set[Any] = set()
        for key in view:
            regular, value = self.store.forward(key, path)
            clauses = [*by_value.get(value, ()), *rest] if regular else self.terms
            if any(term.keep({key}) for term in clauses):
                kept.add(key)
        return kept

    def _route(self) -> tuple[str, dict[Any, list[Term]], list[Term]] | None:
        """(field, clauses by the one value they fix, clauses fixing none) when most clauses fix
        one value of the same field (computed once)."""
        if not self._routes_built:
            self._routes_built = True
            fixed = [_fixed(term) for term in self.terms]
            paths = [f[0] for f in fixed if f is not None]
            path = max(set(paths), key=paths.count) if paths else None
            if path is not None and 2 * paths.count(path) > len(self.terms):
                by_value: dict[Any, list[Term]] = {}
                rest: list[Term] = []
                for term, f in zip(self.terms, fixed, strict=True):
                    if f is not None and f[0] == path:
                        by_value.setdefault(f[1], []).append(term)
                    else:
                        rest.append(term)
                self._routes = (path, by_value, rest)
        return self._routes


def _fixed(term: Term) -> tuple[str, Any] | None:
    """(field, value) when `term` can only match documents holding that one value there."""
    if isinstance(term, AllOf):
        return next((f for f in map(_fixed, term.terms) if f is not None), None)
    if isinstance(term, Equal) and len(term.wanted) == 1 and not term.index.irregular:
        return term.index.path, term.wanted[0]
    return None


class Everything(Term):
    """No narrowing (an empty clause, `$comment`): every document, exactly."""

    def estimate(self, cap: int) -> int:
        return _BIG

    def ids(self) -> Collection[Any]:
        raise AssertionError("Everything has no id set")

    def keep(self, candidates: Collection[Any]) -> Collection[Any]:
        return candidates


EVERYTHING = Everything()


# --------------------------------------------------------------------------- building terms


def build_and(store: _Store, clauses: list[dict[str, Any]]) -> Term | None:
    """The term of a conjunction of clauses (None: nothing in it narrows and it is not exact)."""
    terms: list[Term] = []
    exact = True
    for clause in clauses:
        for key, value in clause.items():
            term = build_term(store, key, value)
            if term is None:
                exact = False
            elif term is not EVERYTHING:
                terms.append(term)
    if not terms:
        return EVERYTHING if exact else None
    if len(terms) == 1 and exact:
        return terms[0]
    return AllOf(terms, exact)


def build_term(store: _Store, key: str, value: Any) -> Term | None:
    if key == "$and":
        if not isinstance(value, list) or not value or not all(isinstance(c, dict) for c in value):
            return None
        return build_and(store, list(value))
    if key == "$or":
        return _build_or(store, value)
    if key == "$comment":
        return EVERYTHING
    if key.startswith("$"):
        return None
    values = equality_values(value)
    if values is not None:
        if key == "_id":
            return IdEqual(store, values)
        index = store._fields.get(key)
        return None if index is None else Equal(store, index, values)
    if key == "_id":
        return None  # `_id` ranges are the plan's `id_range`, answered by the sorted `_id` index
    index = store._fields.get(key)
    if index is None or not index.sortable():
        return None
    bounds = range_bounds(value, value_bracket)
    return None if bounds is None else InRange(store, index, bounds)


def _build_or(store: _Store, value: Any) -> Term | None:
    if not isinstance(value, list) or not value or not all(isinstance(c, dict) for c in value):
        return None
    terms: list[Term] = []
    for clause in value:
        term = build_and(store, [clause]) if clause else EVERYTHING
        if term is None:
            return None
        if term is EVERYTHING:  # this clause alone matches everything
            return EVERYTHING
        terms.append(term)
    return terms[0] if len(terms) == 1 else AnyOf(store, terms)


# --------------------------------------------------------------------------- filter shapes


def flatten_and(filter: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The top-level conjuncts of a filter, one key each ($and lists flattened)."""
    out: list[dict[str, Any]] = []
    for key, value in filter.items():
        if key == "$and":
            if not isinstance(value, list) or not value or not all(isinstance(c, dict) for c in value):
                return None
            for clause in value:
                inner = flatten_and(clause)
                if inner is None:
                    return None
                out.extend(inner)
        else:
            out.append({key: value})
    return out


def id_bounds(clause: dict[str, Any]) -> list[tuple[str, Any]] | None:
    """`[(op, bound), ...]` when the clause is only an `_id` range within sortable brackets."""
    if list(clause) != ["_id"]:
        return None
    value = clause["_id"]
    if not isinstance(value, dict) or not value or not all(op in RANGE_OPS for op in value):
        return None
    bounds = list(value.items())
    if any(id_bracket(b) is None for _, b in bounds):
        return None
    return bounds


def equality_values(value: Any) -> list[Any] | None:
    """The values an equality / `$eq` / `$in` condition accepts (None: another operator)."""
    if plain(value):
        return [value]
    if not isinstance(value, dict) or not value or not all(k in ("$eq", "$in") for k in value):
        return None
    accepted: list[Any] | None = None
    for op, arg in value.items():
        if op == "$eq":
            if not plain(arg):
                return None
            values = [arg]
        else:
            if not isinstance(arg, list | tuple) or not all(plain(v) for v in arg):
                return None
            values = list(arg)
        accepted = values if accepted is None else [v for v in accepted if v in values]
    return accepted


__all__ = [
    "EVERYTHING",
    "AllOf",
    "AnyOf",
    "Equal",
    "IdEqual",
    "InRange",
    "Term",
    "build_and",
    "build_term",
    "equality_values",
    "flatten_and",
    "id_bounds",
]
