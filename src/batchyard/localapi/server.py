"""The HTTP app: OpenAI's Files and Batches endpoints over a `Store`, driven by a `Worker`.

It also answers the synchronous endpoints (`POST /v1/embeddings`, `/v1/chat/completions`,
`/v1/responses`) with the worker's executors, for the real-time lane (see `sync`); every such
call is recorded (`app.state.sync.calls()`).

Errors are answered in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`. With
keys configured, `auth.BearerAuth` sits in front of every route but /healthz and answers a
missing or wrong key 401 before anything else runs. With `faults.transient_error_rate` > 0 a
share of API calls is answered 429/500/503 before any work is done (429 carries
`retry-after: 0`).

Every request body passes `guard.BodyGuard` first: it is refused with 413 as soon as it passes
its cap (`config.max_upload_bytes` for an upload, `config.max_json_bytes` for any other body;
at once when Content-Length already says so), and a body whose next piece does not come within
`config.body_idle_timeout_s` gets 408. Uploads are spooled (in memory up to 1 MB, then to a
temporary file), so a large upload is never held in memory whole.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect

from batchyard.localapi import shapes
from batchyard.localapi.auth import (
    OPEN,
    BearerAuth,
    KeyRing,
    Principal,
    load_admin_keys,
    load_api_keys,
)
from batchyard.localapi.guard import BodyGuard, Rejections, http_limits, too_large
from batchyard.localapi.middleware import RecordSyncCalls, TransientFaults
from batchyard.localapi.store import StorageFull
from batchyard.localapi.sync import SYNC_PATHS, SyncEndpoints, json_body

if TYPE_CHECKING:
    from batchyard.localapi.config import LocalApiConfig
    from batchyard.localapi.store import Store
    from batchyard.localapi.worker import Worker

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
SDK_BATCH_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
MIN_EXPIRES_S, MAX_EXPIRES_S = 3600, 2_592_000


def _missing(name: str) -> shapes.ApiError:
    return shapes.ApiError(
        400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
    )


def _invalid(name: str, message: str) -> shapes.ApiError:
    return shapes.ApiError(400, message, param=name, code="invalid_value")


def parse_expires_after(anchor: Any, seconds: Any, name: str) -> int | None:
    """Seconds of an `{anchor: "created_at", seconds: N}` policy (None when both are absent)."""
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise _invalid(
            f"{name}.anchor",
            f"Invalid value for '{name}.anchor': {shapes.shown(anchor)}. Supported values are: 'created_at'.",
        )
    try:
        secs = int(seconds)
    except (TypeError, ValueError):
        raise _invalid(
            f"{name}.seconds", f"Invalid '{name}.seconds': expected an integer."
        ) from None
    if not MIN_EXPIRES_S <= secs <= MAX_EXPIRES_S:
        raise _invalid(
            f"{name}.seconds",
            f"Invalid '{name}.seconds': {shapes.shown(secs)}. Expected a value between {MIN_EXPIRES_S} and {MAX_EXPIRES_S}.",
        )
    return secs


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """Validate batch metadata: ≤16 pairs, string keys ≤64 chars, string values ≤512 chars."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise _invalid("metadata", "Invalid 'metadata': expected an object.")
    if len(metadata) > 16:
        raise _invalid(
            "metadata",
            f"Invalid 'metadata': too many properties ({len(metadata)}); the maximum is 16.",
        )
    for key, val in metadata.items():
        if len(key) > 64:
            raise _invalid(
                "metadata", f"Invalid 'metadata': key {shapes.shown(key, 20)} is longer than 64 characters."
            )
        if not isinstance(val, str):
            raise _invalid(
                "metadata", f"Invalid 'metadata': the value of {shapes.shown(key)} must be a string."
            )
        if len(val) > 512:
            raise _invalid(
                "metadata",
                f"Invalid 'metadata': the value of {shapes.shown(key)} is longer than 512 characters.",
            )
    return dict(metadata)


async def read_upload(request: Request, limit: int) -> FormData:
    """The multipart form of an upload, its file spooled and at most `limit` bytes (else 413).

    The body's size is capped while it streams by `guard.BodyGuard`, in front of every route.
    """
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise _missing("file")
    parser = MultiPartParser(request.headers, request.stream(), max_files=1, max_fields=16)
    try:
        form = await parser.parse()  # closes its spooled files itself when it fails
    except (shapes.ApiError, ClientDisconnect):
        raise
    except Exception as exc:
        raise shapes.ApiError(400, f"Invalid multipart body: {shapes.shown(str(exc))}") from None
    part = form.get("file")
    if isinstance(part, UploadFile) and part.size is not None and part.size > limit:
        await form.close()
        raise too_large(limit, upload=True)
    return form


def _storage_full(cap: int) -> shapes.ApiError:
    return shapes.ApiError(
        413,
        f"Storage limit reached: this key's files may hold at most {cap:,} bytes "
        "(provider.local.max_storage_bytes_per_key); delete files or let them expire.",
        param="file",
        code="storage_limit_exceeded",
    )


def _limit(value: int, hi: int) -> int:
    if not 1 <= value <= hi:
        raise _invalid("limit", f"Invalid 'limit': {value}. Expected a value between 1 and {hi}.")
    return value


def create_app(
    config: LocalApiConfig,
    store: Store,
    worker: Worker,
    api_keys: Sequence[str] | None = None,
    admin_keys: Sequence[str] | None = None,
) -> FastAPI:
    """The FastAPI app of the local Batch API server, keyed when there are keys.

    `api_keys` and `admin_keys` are the keys already loaded from `config` (None: load them
    here). Each key sees only its own files and batches, an admin key all of them; without any
    key, every request sees everything (`auth.OPEN`).

    Raises:
        ServeRefused: a configured key or key file is unusable.
    """
    keys = KeyRing(load_api_keys(config) if api_keys is None else api_keys,
                   load_admin_keys(config) if admin_keys is None else admin_keys, tag=store.owner_tag)

    def who(request: Request) -> Principal:
        """The principal the key check put on the request (OPEN only on a server without keys)."""
        principal = getattr(request.state, "principal", None if keys else OPEN)
        if not isinstance(principal, Principal):  # a route outside the key check: never
            raise shapes.ApiError(401, "No API key was checked for this request.")
        return principal
    app = FastAPI(
        title="batchyard local Batch API", docs_url=None, redoc_url=None, openapi_url=None
    )
    faults = config.faults

    def err(exc: shapes.ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(shapes.ApiError)
    async def _api_error(request: Request, exc: shapes.ApiError) -> JSONResponse:
        return err(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = (
            f"Invalid URL ({request.method} {shapes.shown(request.url.path, quote=False)})"
            if exc.status_code in (404, 405)
            else str(exc.detail)
        )
        return err(shapes.ApiError(exc.status_code, msg))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return err(
            shapes.ApiError(
                400,
                f"Invalid request: {first.get('msg', 'bad parameter')}",
                param=param,
                code="invalid_value",
            )
        )

    sync = SyncEndpoints(faults, worker.executor)
    app.state.sync = sync
    app.add_middleware(TransientFaults, faults=faults)
    app.add_middleware(RecordSyncCalls, sync=sync)  # outside the transient faults: their answers are recorded too
    if keys:  # added late, so it runs early: nothing is done for a request without a key
        app.add_middleware(BearerAuth, keys=keys)
    rejections = Rejections()
    app.state.rejections = rejections  # the runner's protocol counts into the same log lines
    app.add_middleware(BodyGuard, limits=http_limits(config), rejections=rejections,
                       is_upload=lambda scope: scope["method"] == "POST" and scope["path"] == "/v1/files")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # ------------------------------------------------------------------ synchronous endpoints
    async def sync_call(request: Request) -> Response:
        raw = await request.body()  # capped at max_json_bytes by the BodyGuard
        answer = await run_in_threadpool(sync.answer, request.url.path, raw)
        seen = getattr(request.state, "sync_call", None)
        if isinstance(seen, dict):
            seen.update(tokens=answer.tokens, digest=answer.digest, arrival=answer.arrival)
        if answer.delay_s > 0:
            await asyncio.sleep(answer.delay_s)
        return Response(
            answer.body,
            status_code=answer.status,
            headers=answer.headers,
            media_type="application/json",
        )

    for path in SYNC_PATHS:
        app.add_api_route(path, sync_call, methods=["POST"], include_in_schema=False)

    # ------------------------------------------------------------------ files
    def _file_or_404(file_id: str, principal: Principal) -> dict[str, Any]:
        meta = store.get_file(file_id)
        if meta is None or not principal.sees(store.file_owner(file_id)):
            raise shapes.ApiError(404, f"No such File object: {shapes.shown(file_id, quote=False)}", param="id")
        return meta

    def _cap(principal: Principal) -> int | None:
        return None if principal.admin else config.max_storage_bytes_per_key

    @app.post("/v1/files")
    async def upload_file(request: Request) -> JSONResponse:
        principal = who(request)
        cap = _cap(principal)
        if cap is not None and store.used_bytes(principal.owner) >= cap:
            raise _storage_full(cap)  # before a byte of the upload is read
        form = await read_upload(request, config.max_upload_bytes)
        try:
            return JSONResponse(await _store_upload(form, principal))
        finally:
            await form.close()

    async def _store_upload(form: FormData, principal: Principal) -> dict[str, Any]:
        upload_part = form.get("file")
        if not isinstance(upload_part, UploadFile):
            raise _missing("file")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        purpose = fields.get("purpose")
        if not purpose:
            raise _missing("purpose")
        if purpose not in UPLOAD_PURPOSES:
            raise _invalid(
                "purpose",
                f"Invalid value for 'purpose': {shapes.shown(purpose)}. Supported values are: {', '.join(map(repr, UPLOAD_PURPOSES))}.",
            )
        ttl = parse_expires_after(
            fields.get("expires_after[anchor]"),
            fields.get("expires_after[seconds]"),
            "expires_after",
        )
        if ttl is None and purpose == "batch":
            ttl = shapes.BATCH_FILE_TTL_S
        try:
            return await run_in_threadpool(
                store.add_file,
                upload_part.file,
                filename=upload_part.filename or shapes.DEFAULT_FILENAME,
                purpose=purpose,
                expires_after_s=ttl,
                owner=principal.owner,
                cap=_cap(principal),
            )
        except StorageFull as exc:
            raise _storage_full(exc.cap) from None

    @app.get("/v1/files")
    def list_files(
        request: Request,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10_000,
        order: str = "desc",
    ) -> dict[str, Any]:
        if order not in ("asc", "desc"):
            raise _invalid(
                "order",
                f"Invalid value for 'order': {shapes.shown(order)}. Supported values are: 'asc' and 'desc'.",
            )
        items = store.list_files(purpose=purpose, order=order, visible=who(request).sees)
        page, more = shapes.paginate(items, after=after, limit=_limit(limit, 10_000))
        return shapes.list_page(page, more)

    @app.get("/v1/files/{file_id}")
    def get_file(request: Request, file_id: str) -> dict[str, Any]:
        return _file_or_404(file_id, who(request))

    @app.get("/v1/files/{file_id}/content")
    def file_content(request: Request, file_id: str) -> FileResponse:
        meta = _file_or_404(file_id, who(request))
        return FileResponse(
            store.blob_path(file_id),
            media_type="application/octet-stream",
            filename=shapes.safe_filename(meta["filename"]),  # also for files stored before names were
        )

    @app.delete("/v1/files/{file_id}")
    def delete_file(request: Request, file_id: str) -> dict[str, Any]:
        _file_or_404(file_id, who(request))
        if not store.delete_file(file_id):
            raise shapes.ApiError(404, f"No such File object: {shapes.shown(file_id, quote=False)}", param="id")
        return {"id": file_id, "object": "file", "deleted": True}

    # ------------------------------------------------------------------ batches
    def _batch_or_404(batch_id: str, principal: Principal) -> dict[str, Any]:
        rec = store.get_batch(batch_id)
        if rec is None or not principal.sees(rec.get("owner")):
            raise shapes.ApiError(404, f"No batch found with id {shapes.shown(batch_id)}.", param="batch_id")
        return rec["batch"]

    @app.post("/v1/batches")
    async def create_batch(request: Request) -> dict[str, Any]:
        params = json_body(await request.body())
        if not isinstance(params, dict):
            raise shapes.ApiError(400, "The request body must be a JSON object.")
        return await run_in_threadpool(_create_batch, params, who(request))

    def _create_batch(params: dict[str, Any], principal: Principal) -> dict[str, Any]:
        for name in ("input_file_id", "endpoint", "completion_window"):
            if params.get(name) is None:
                raise _missing(name)
        endpoint, window = params["endpoint"], params["completion_window"]
        if endpoint not in SDK_BATCH_ENDPOINTS:
            raise _invalid(
                "endpoint",
                f"Invalid value for 'endpoint': {shapes.shown(endpoint)}. Supported values are: {', '.join(map(repr, SDK_BATCH_ENDPOINTS))}.",
            )
        if endpoint not in shapes.SUPPORTED_ENDPOINTS:
            raise _invalid(
                "endpoint",
                f"The local Batch API server does not support {shapes.shown(endpoint)}; supported: {', '.join(shapes.SUPPORTED_ENDPOINTS)}.",
            )
        if window != "24h":
            raise _invalid(
                "completion_window",
                f"Invalid value for 'completion_window': {shapes.shown(window)}. Supported values are: '24h'.",
            )
        metadata = check_metadata(params.get("metadata"))
        oea = params.get("output_expires_after")
        ttl = None
        if oea is not None:
            if not isinstance(oea, dict):
                raise _invalid(
                    "output_expires_after", "Invalid 'output_expires_after': expected an object."
                )
            ttl = parse_expires_after(oea.get("anchor"), oea.get("seconds"), "output_expires_after")
        file_id = params["input_file_id"]
        meta = store.get_file(file_id)
        if meta is None or not principal.sees(store.file_owner(file_id)):
            raise _invalid(
                "input_file_id", f"Invalid 'input_file_id': no file with id {shapes.shown(file_id)} exists."
            )
        if meta["purpose"] != "batch":
            raise _invalid(
                "input_file_id",
                f"Invalid 'input_file_id': file {shapes.shown(file_id)} has purpose {shapes.shown(meta['purpose'])}; a batch input file must have purpose 'batch'.",
            )
        now = time.time()
        batch = shapes.new_batch(
            shapes.new_id("batch_", 16),
            input_file_id=file_id,
            endpoint=endpoint,
            completion_window=window,
            created_at=int(now),
            metadata=metadata,
        )
        store.add_batch(
            {
                "batch": batch,
                "t": {"created": now},
                "tokens": 0,
                "output_expires_after": ttl,
                "cancel_reason": None,
                "owner": principal.owner,  # its output and error files will be the owner's too
            }
        )
        response = copy.deepcopy(batch)  # the worker mutates the stored record from now on
        worker.wake()
        return response

    @app.get("/v1/batches")
    def list_batches(request: Request, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        batches = store.list_batches(visible=who(request).sees)
        page, more = shapes.paginate(batches, after=after, limit=_limit(limit, 100))
        return shapes.list_page(page, more)

    @app.get("/v1/batches/{batch_id}")
    def get_batch(request: Request, batch_id: str) -> dict[str, Any]:
        return _batch_or_404(batch_id, who(request))

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(request: Request, batch_id: str) -> dict[str, Any]:
        _batch_or_404(batch_id, who(request))

        def apply(rec: dict[str, Any]) -> dict[str, Any]:
            b = rec["batch"]
            if b["status"] in ("validating", "in_progress", "finalizing"):
                now = time.time()
                b.update(status="cancelling", cancelling_at=int(now))
                rec["t"]["cancelling"] = now
                rec["cancel_reason"] = "client"
            elif b["status"] not in ("cancelling", "cancelled"):
                raise shapes.ApiError(
                    400, f"Cannot cancel a batch with status '{b['status']}'.", code="invalid_state"
                )
            return copy.deepcopy(b)

        batch = store.update_batch(batch_id, apply)
        worker.wake()
        return batch

    return app
