"""How mongomock's `Collection` and `Cursor` reach `IndexedCollectionStore` (`install_indexed_store`).

mongomock answers everything through `Collection._iter_documents` (a scan) and materialises a
cursor's whole result before applying its limit. `install_indexed_store()` (called by
`batchyard.clients.mongo.patch_mongomock`) makes every mongomock collection created afterwards an
`IndexedCollectionStore` and routes, for such collections only:

- `_iter_documents` (finds, updates, deletes, unique checks) to `store.select` (index candidates);
- a cursor's (skip, limit) window, when unsorted or sorted by `_id` alone, to `store.window`
  (only the window is read, in one batch), projected here without mongomock's per-document copies;
  a projection of `_id` alone (all ids of a company) decodes no document;
- a limited cursor sorted on one other indexed field (the newest `updated_at`) to
  `store.sorted_window`, which walks that field's sorted values;
- `count_documents` and a leading `$match` + `$group` by indexed fields with `{$sum: 1}` to the
  indexes (no document decoded); another leading `$match` becomes a `find`;
- a `$set` update (the marks) to `_keyed_set`: mongomock's update code, but the "before" copy is
  decoded from the stored bytes instead of `copy.deepcopy` of each document;
- `_ensure_uniques` first stores the document mongomock changed in place (`store.sync`).

Anything else falls through to mongomock unchanged. Not streamed: a cursor without a limit still
holds all its matching documents at once, as mongomock's cursors do (the pipeline always pages).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import bson
from bson import ObjectId

from batchyard.clients.standin import IndexedCollectionStore, collection_store_class, store_key


def install_indexed_store() -> None:
    """Route mongomock's collections through `IndexedCollectionStore` (idempotent)."""
    from mongomock import aggregate, helpers, store
    from mongomock.collection import Collection, Cursor

    cls = collection_store_class()
    if getattr(Collection, "_batchyard_indexed", False):
        return
    store.CollectionStore = cls  # type: ignore[misc]  # every new in-memory collection gets the indexes
    helpers.patch_datetime_awareness_in_document = _datetime_patcher(helpers.patch_datetime_awareness_in_document)

    orig_iter = Collection._iter_documents
    orig_update = Collection._update
    orig_uniques = Collection._ensure_uniques
    orig_count = Collection.count_documents
    orig_aggregate = Collection.aggregate
    orig_compute = Cursor._compute_results

    def _iter_documents(self: Any, filter: Any) -> Any:
        st = self._store
        if isinstance(st, IndexedCollectionStore):
            found = st.select(filter)
            if found is not None:
                return found
        return orig_iter(self, filter)

    def _update(self: Any, spec: Any, document: Any, upsert: bool = False, manipulate: bool = False,
                multi: bool = False, check_keys: bool = False, **options: Any) -> Any:
        st = self._store
        if isinstance(st, IndexedCollectionStore) and not manipulate and not any(options.values()):
            done = _keyed_set(self, st, spec, document, multi)
            if done is not None and (done["n"] or not upsert):
                return done
        return orig_update(self, spec, document, upsert, manipulate, multi, check_keys, **options)

    def _ensure_uniques(self: Any, new_data: Any) -> None:
        st = self._store
        if isinstance(st, IndexedCollectionStore):
            st.sync(new_data)
        orig_uniques(self, new_data)

    def count_documents(self: Any, filter: Any, **kwargs: Any) -> int:
        st = self._store
        if isinstance(st, IndexedCollectionStore) and not kwargs:
            n = st.count(helpers.patch_datetime_awareness_in_document(filter))
            if n is not None:
                return n
        return int(orig_count(self, filter, **kwargs))

    def aggregate_(self: Any, pipeline: Any, session: Any = None, **kwargs: Any) -> Any:
        st = self._store
        stages = list(pipeline) if isinstance(pipeline, list | tuple) else None
        if isinstance(st, IndexedCollectionStore) and stages and not session:
            match, rest = _leading_match(stages)
            if rest and list(rest[0]) == ["$group"] and isinstance(rest[0]["$group"], dict):
                grouped = st.group_counts(helpers.patch_datetime_awareness_in_document(match), rest[0]["$group"])
                if grouped is not None:
                    return aggregate.process_pipeline(grouped, self.database, rest[1:], None)
            if match is not None:
                docs = list(self.find(match))
                return aggregate.process_pipeline(docs, self.database, rest, None)
        return orig_aggregate(self, pipeline, session=session, **kwargs)

    def _compute_results(self: Any, with_limit_and_skip: bool = False) -> Any:
        if not with_limit_and_skip:
            return orig_compute(self, with_limit_and_skip=False)
        key = (self._factory, self._skip, self._limit)
        if getattr(self, "_batchyard_key", None) != key:
            window = _fast_window(self)
            if window is None:
                # mongomock re-slices its whole result list on every next(): slice once instead
                results = orig_compute(self, with_limit_and_skip=False)
                window = results[self._skip :]
                if self._limit:
                    window = window[: abs(self._limit)]
            self._batchyard_key, self._batchyard_window = key, window
        return self._batchyard_window

    Collection._iter_documents = _iter_documents  # type: ignore[method-assign]
    Collection._update = _update  # type: ignore[method-assign,assignment]
    Collection._ensure_uniques = _ensure_uniques  # type: ignore[method-assign]
    Collection.count_documents = count_documents  # type: ignore[method-assign]
    Collection.aggregate = aggregate_  # type: ignore[method-assign]
    Cursor._compute_results = _compute_results  # type: ignore[method-assign]
    Collection._batchyard_indexed = True  # type: ignore[attr-defined]


_AS_IS = frozenset({str, int, float, bool, type(None), ObjectId, bytes, bson.Int64})


def _datetime_patcher(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """mongomock's `patch_datetime_awareness_in_document`, quick on values without dates.

    mongomock runs it over every filter of every query: the snapshot's targets filter (one
    string per document of every company) cost 50 ms per page through the original, which
    tests five types per string. Same result: plain dicts and lists are rebuilt, values of the
    types above are returned as they are, anything else goes to the original.
    """

    def patch(value: Any) -> Any:
        kind = type(value)
        if kind in _AS_IS:
            return value
        if kind is list:
            return [v if type(v) in _AS_IS else patch(v) for v in value]
        if kind is dict:
            return {k: v if type(v) in _AS_IS else patch(v) for k, v in value.items()}
        return original(value)

    return patch


def _keyed_set(coll: Any, st: IndexedCollectionStore, spec: Any, document: Any, multi: bool) -> dict[str, Any] | None:
    """mongomock's `_update` for a `$set` update (the marks), minus its per-document deepcopy.

    The update itself is mongomock's (`_apply_update_document`); what differs is only that the
    "before" copy is decoded from the stored bytes. None: not this shape (mongomock does it).
    An upsert that matches nothing is left to mongomock (it inserts).
    """
    if not isinstance(document, dict) or list(document) != ["$set"] or not isinstance(spec, dict):
        return None
    fields = document["$set"]
    if not isinstance(fields, dict) or not fields or any(k == "_id" or k.startswith("_id.") for k in fields):
        return None
    from mongomock import DuplicateKeyError, helpers

    spec = helpers.patch_datetime_awareness_in_document(spec)
    document = helpers.patch_datetime_awareness_in_document(document)
    pairs = st.select_pairs(spec)
    if pairs is None:
        return None
    matched = modified = 0
    for existing, original in pairs:
        coll._apply_update_document(existing, spec, document, False)
        matched += 1
        if existing != original:
            try:
                coll._ensure_uniques(existing)  # stores it (see `sync`), then checks
            except DuplicateKeyError:
                st[store_key(original["_id"])] = original  # roll back, as mongomock does
                raise
            modified += 1
        if not multi:
            break
    return {
        "connectionId": coll.database.client._id,
        "err": None,
        "n": matched,
        "nModified": modified if matched else 0,
        "ok": 1,
        "upserted": None,
        "updatedExisting": matched > 0,
    }


def _leading_match(stages: list[Any]) -> tuple[Any, list[Any]]:
    first = stages[0]
    if isinstance(first, dict) and list(first) == ["$match"] and isinstance(first["$match"], dict):
        return first["$match"], stages[1:]
    return None, stages


def _fast_window(cursor: Any) -> list[dict[str, Any]] | None:
    """A cursor's (skip, limit) window computed from the indexes (None: mongomock computes it)."""
    st = cursor.collection._store
    if not isinstance(st, IndexedCollectionStore):
        return None
    sort = _one_sort(cursor._sort)
    if sort is False:
        return None
    limit = None if not cursor._limit else cursor._skip + abs(cursor._limit)
    coll = cursor.collection
    aware = bool(coll.codec_options.tz_aware)
    if sort is not None and sort[0] != "_id":
        docs = st.sorted_window(cursor._spec, sort[0], sort[1], limit, tz_aware=aware)
    else:
        docs = st.window(cursor._spec, None if sort is None else sort[1], limit, tz_aware=aware,
                         ids_only=_ids_only(cursor._projection))
    if docs is None:
        return None
    project = _Projection(cursor._projection)
    out = []
    for doc in docs[cursor._skip :]:
        projected = project(doc)
        out.append(coll._copy_only_fields(doc, cursor._projection, dict) if projected is None else projected)
    return out


class _Projection:
    """mongomock's `_copy_only_fields` for plain include/exclude projections, without copies.

    The documents are freshly decoded, so nothing needs copying; anything else (operators,
    arrays under a dotted path, mixed modes) returns None and mongomock projects it.
    """

    def __init__(self, projection: Any) -> None:
        self.whole = projection is None or projection == {}
        self.tree: dict[str, Any] | None = None
        self.keep_id = True
        self.include = True
        if self.whole or not isinstance(projection, dict):
            return
        from mongomock.collection import _combine_projection_spec

        fields = dict(projection)
        self.keep_id = fields.pop("_id", 1) != 0
        values = set(fields.values())
        if not values <= {0, 1} or len(values) > 1:
            return
        self.include = bool(values.pop()) if values else True
        try:
            self.tree = _plain_dicts(_combine_projection_spec(fields)) if fields else {}
        except Exception:
            self.tree = None

    def __call__(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        if self.whole:
            return doc
        if self.tree is None:
            return None
        out: dict[str, Any] | None
        if not self.tree:  # only `_id` was named
            out = {} if self.keep_id else doc
        else:
            out = _project(doc, self.tree, self.include)
            if out is None:
                return None
        if not self.keep_id:
            out.pop("_id", None)
        elif "_id" in doc:
            out["_id"] = doc["_id"]
        return out


def _plain_dicts(tree: dict[str, Any]) -> dict[str, Any]:
    """mongomock's OrderedDict projection tree as plain dicts (faster to walk)."""
    return {k: _plain_dicts(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _project(doc: dict[str, Any], tree: dict[str, Any], include: bool) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    if include:  # walk the (few) named fields, not the whole document
        for key, spec in tree.items():
            if key not in doc:
                continue
            value = doc[key]
            if spec.__class__ is not dict:  # a leaf: the snapshot's common case, kept cheap
                out[key] = value
                continue
            if isinstance(value, dict):
                inner = _project(value, spec, include)
                if inner is None:
                    return None
                out[key] = inner
            elif isinstance(value, list | tuple):
                return None  # projected element by element: leave it to mongomock
        return out
    for key, value in doc.items():
        spec = tree.get(key, _ABSENT)
        if isinstance(spec, dict):
            if isinstance(value, dict):
                inner = _project(value, spec, include)
                if inner is None:
                    return None
                out[key] = inner
            elif isinstance(value, list | tuple):
                return None  # projected element by element: leave it to mongomock
        elif (spec is not _ABSENT) == include:
            out[key] = value
    return out


_ABSENT = object()


def _one_sort(sort: Any) -> tuple[str, int] | Literal[False] | None:
    """(field, 1 / -1) for a sort on one field, None for no sort, False for any other sort."""
    if not sort:
        return None
    items = list(sort.items()) if isinstance(sort, dict) else list(sort)
    if len(items) != 1:
        return False
    field, direction = items[0]
    if not isinstance(field, str) or field.startswith("$") or direction not in (1, -1):
        return False
    return field, int(direction)


def _ids_only(projection: Any) -> bool:
    """A projection of `_id` alone (`{"_id": 1}`)."""
    return isinstance(projection, dict) and list(projection) == ["_id"] and projection["_id"] in (1, True)


__all__ = ["install_indexed_store"]
