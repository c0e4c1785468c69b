"""`batchyard search`: the chunks nearest to a text, from the Milvus collection of the configured
embedding space, with their texts from the document store.

Why: after a backfill a user wants to look at what they got. The query is embedded the way the
corpus was (the configured provider, model and dimensions, through the real-time endpoint
`/v1/embeddings` of the same `openai` client the real-time lane uses; the embedded local server
when no key is set, so it works offline), so a stored chunk's own text finds itself first with a
similarity of about 1.

Identical texts (the same text sha256: boilerplate repeated across filings) are shown once, with
`count`, the number of chunks in the searched scope (the whole collection, or the company or
document asked for) that carry that text. Milvus is asked for `2k` neighbours at a time, each
round excluding the texts already found (`text_sha256 not in [...]`), until `k` distinct texts
are found or the scope has no more, so a passage repeated 2,000 times costs one round, not a
top-2,000 search. Texts come from the source by chunk id; a chunk deleted from the source since
it was embedded shows with `text` null.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from batchyard.errors import ConfigError, TerminalError

if TYPE_CHECKING:
    from batchyard.context import RunContext

MAX_K = 1_000
"""Most distinct texts one search returns (Milvus caps a search at 16,384 neighbours)."""


class NoCollection(TerminalError):
    """The embedding space has no Milvus collection yet: nothing was embedded in it."""

    def __init__(self, collection: str, space: str, where: str) -> None:
        self.collection = collection
        super().__init__(
            f"no Milvus collection {collection!r} for embedding space {space} in {where}: "
            "run `batchyard embed --targets <file>` first"
        )


class UnknownScope(ConfigError):
    """The company or document asked for has no vector (and, maybe, no chunk at all)."""


def scope_filter(company: str | None, document: str | None) -> str:
    """The Milvus filter of a company and/or document (string literals JSON-escaped)."""
    clauses = [f"{field} == {json.dumps(value, ensure_ascii=False)}"
               for field, value in (("company_id", company), ("document_id", document)) if value is not None]
    return " and ".join(clauses)


def _and(*clauses: str) -> str:
    return " and ".join(f"({c})" for c in clauses if c)


def new_texts(hits: Iterable[dict[str, Any]], seen: dict[str, dict[str, Any]]) -> int:
    """Add to `seen` (text sha256 -> best hit, in rank order) the hits whose text is new;
    returns how many were added. Hits come best first, so the first of each text is its best."""
    added = 0
    for hit in hits:
        sha = hit.get("text_sha256") or f"chunk:{hit['chunk_id']}"  # no hash: never merged
        if sha not in seen:
            seen[sha] = hit
            added += 1
    return added


def id_candidates(chunk_id: str) -> list[Any]:
    """The values a source `_id` may have for a chunk id string: a Milvus chunk_id is the string
    form of a str, ObjectId or int id (`snapshot.id_kind`), and Milvus does not keep which."""
    from bson import ObjectId

    out: list[Any] = [chunk_id]
    if ObjectId.is_valid(chunk_id) and len(chunk_id) == 24:
        out.append(ObjectId(chunk_id))
    if chunk_id.lstrip("-").isdigit():
        out.append(int(chunk_id))
    return out


def check_query(query: str, *, max_tokens: int, encoding: str) -> None:
    """A query must have text, and fit one embeddings input."""
    from batchyard.tokens import count_tokens

    if not query.strip():
        raise ConfigError("the search text is empty")
    tokens = count_tokens([query], encoding)[0]
    if tokens > max_tokens:
        raise ConfigError(f"the search text is {tokens:,} tokens; an embeddings input takes at most "
                          f"{max_tokens:,} (limits.max_tokens_per_input)")


def search_text(
    ctx: RunContext,
    query: str,
    *,
    k: int = 10,
    company: str | None = None,
    document: str | None = None,
) -> list[dict[str, Any]]:
    """The `k` nearest distinct texts to `query`, best first (see the module docstring).

    Each hit: rank, score (Milvus' distance: a similarity for COSINE and IP, higher is nearer;
    a distance for L2), chunk_id, company, document, chunk_index, text_sha256, count, text.

    Raises:
        ConfigError: an empty or too long query, k out of range, an unknown company or document.
        NoCollection: nothing was embedded in this space yet.
        DimensionMismatch: the collection has another dimension than the configured space.
        VectorStoreError: Milvus failed (unreachable, refused), in one line naming where.
    """
    from pymilvus.exceptions import MilvusException

    from batchyard.clients.milvus import VectorStoreError, collection_name, vector_store_label
    from batchyard.tokens import encoding_for_model

    if not 1 <= k <= MAX_K:
        raise ConfigError(f"--k must be between 1 and {MAX_K}, not {k}")
    s = ctx.settings
    emb = s.embedding
    check_query(query, max_tokens=s.limits.max_tokens_per_input, encoding=emb.encoding or encoding_for_model(emb.model))
    name = collection_name(s.milvus.collection_prefix, emb.space)
    where = vector_store_label(s.milvus, default_path=str(ctx.staging.local_dir() / "milvus.db"))
    try:
        return _search(ctx, query, name, where, k=k, company=company, document=document)
    except MilvusException as exc:  # unreachable server, bad token, ...: one line, naming where
        raise VectorStoreError(name, f"{' '.join(str(exc.message).split())} ({where})") from None


def _search(ctx: RunContext, query: str, name: str, where: str, *, k: int, company: str | None,
            document: str | None) -> list[dict[str, Any]]:
    from batchyard.clients.milvus import DimensionMismatch, collection_dim, count, search
    from batchyard.jobs.embeddings import NATIVE_DIMS

    emb = ctx.settings.embedding
    client = ctx.milvus
    if not client.has_collection(name):
        raise NoCollection(name, emb.space, where)
    dims = emb.dimensions or NATIVE_DIMS.get(emb.model, 1536)
    existing = collection_dim(client, name)
    if existing != dims:
        raise DimensionMismatch(name, existing, dims)
    scope = scope_filter(company, document)
    if scope and count(client, name, filter=scope) == 0:  # count() loads a released collection
        raise _unknown_scope(ctx, name, company, document)
    client.load_collection(name)
    [vector] = ctx.api.embed(emb.model, [query], emb.dimensions if emb.pass_dimensions else None)
    seen: dict[str, dict[str, Any]] = {}
    while len(seen) < k:
        exclude = f"text_sha256 not in {json.dumps(list(seen))}" if seen else ""
        limit = 2 * (k - len(seen))
        hits = search(client, name, vector, limit=limit, filter=_and(scope, exclude), consistency_level="Strong")
        if not new_texts(hits, seen) or len(hits) < limit:
            break
    best = list(seen.values())[:k]
    texts = _texts(ctx, [h["chunk_id"] for h in best])
    return [{
        "rank": rank,
        "score": round(h["distance"], 6),
        "chunk_id": h["chunk_id"],
        "company": h.get("company_id"),
        "document": h.get("document_id"),
        "chunk_index": h.get("chunk_index"),
        "text_sha256": h.get("text_sha256"),
        "count": count(client, name, filter=_and(scope, f"text_sha256 == {json.dumps(h['text_sha256'])}"))
        if h.get("text_sha256") else 1,
        "text": texts.get(h["chunk_id"]),
    } for rank, h in enumerate(best, 1)]


def _texts(ctx: RunContext, chunk_ids: list[str]) -> dict[str, str]:
    """Texts of chunks by chunk id, read from the document store."""
    from batchyard.stages.snapshot import get_path

    fields = ctx.settings.mongo.fields
    wanted = [v for c in chunk_ids for v in id_candidates(c)]
    docs = ctx.store.chunks.find({fields.chunk_id: {"$in": wanted}}, {fields.chunk_id: 1, fields.text: 1})
    out: dict[str, str] = {}
    for doc in docs:
        text = get_path(doc, fields.text)
        if isinstance(text, str):
            out[str(get_path(doc, fields.chunk_id))] = text
    return out


def _unknown_scope(ctx: RunContext, collection: str, company: str | None, document: str | None) -> UnknownScope:
    """Why a company/document scope has no vector: not in the source at all, or not embedded."""
    fields = ctx.settings.mongo.fields
    what = " ".join(f"{kind} {value!r}" for kind, value in (("company", company), ("document", document))
                    if value is not None)
    query = {f: v for f, v in ((fields.company, company), (fields.document, document)) if v is not None}
    if ctx.store.chunks.find_one(query, {"_id": 1}) is None:
        return UnknownScope(f"unknown {what}: no chunk of it in {ctx.store.label}")
    return UnknownScope(f"{what} has no vector in Milvus collection {collection!r} yet: "
                        "run `batchyard embed` with it in the targets")
