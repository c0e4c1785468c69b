"""The staging area: local disk or S3, every write atomic.

Local writes go to a temporary file in the target's directory and are then `os.replace`d, so a
crash never leaves a half-written file that later looks complete. On S3 an object appears only
when its single PUT (or multipart upload) completes, which gives the same guarantee; a
page-by-page Parquet file is spooled to a local temporary file and uploaded when complete.

On S3, s3fs's directory-listing cache is off: listings and `exists` always ask S3, so a file
another process (or another filesystem instance) wrote is seen at once. Polars reads S3
through its own object-store client, which takes different option names (`polars_options`).

Local staging is owner-only (`perms.Access`): every folder batchyard creates is 0700 and every
file 0600, whatever the umask; with `staging.group`, folders are 2750 and files 0640 for that
group.

What cannot live on S3 (Milvus Lite, the MongoDB stand-in, the embedded Batch API server's
state) goes to `local_dir()`: under the root when it is local; with an S3 root, under
`<local_root>/s3/<bucket>/<prefix>/`, where `local_root` defaults to `./.batchyard` in the
working directory at the time the Staging is opened. Such state is per machine: a run staged on
S3 and resumed elsewhere finds its staged files but not that local state.
"""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from batchyard.storage.perms import Access

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from batchyard.settings import StagingSettings


# botocore logs every prepared request at DEBUG, Authorization header (with the access key id)
# included; these loggers get a filter that masks the S3 credentials a Staging was opened with
_CLIENT_LOGGERS = ("botocore.endpoint", "aiobotocore.endpoint")
_MASK = "**********"

# Parquet row groups of about this size: a reader that filters (a shard of requests.parquet)
# skips the others, and a writer never buffers one huge group of long JSON lines
_ROW_GROUP_BYTES = 16 << 20


def _row_group_rows(df: pl.DataFrame) -> int:
    """Rows per Parquet row group so that one holds about `_ROW_GROUP_BYTES` of data."""
    if df.height == 0:
        return 1
    per_row = max(1.0, df.estimated_size() / df.height)
    return max(1, int(_ROW_GROUP_BYTES / per_row))


class _RedactSecrets(logging.Filter):
    """Masks known secret strings in the records of the loggers it is attached to."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            msg = record.getMessage()
            hits = [s for s in self.secrets if s in msg]
            if hits:
                for secret in sorted(hits, key=len, reverse=True):
                    msg = msg.replace(secret, _MASK)
                record.msg, record.args = msg, None
        return True


_REDACT = _RedactSecrets()


def _redact_in_client_logs(*secrets: str | None) -> None:
    """Mask these secrets in the S3 client's debug logs from now on (short strings are left)."""
    _REDACT.secrets.update(s for s in secrets if s and len(s) >= 4)
    for name in _CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)


class Staging:
    """A staging root with atomic writes; paths are `/`-joined strings relative to the root."""

    def __init__(
        self,
        root: str,
        *,
        storage_options: dict[str, Any] | None = None,
        local_root: str | Path | None = None,
        access: Access | None = None,
    ) -> None:
        """Open a root: a local directory (created) or `s3://bucket[/prefix]`.

        `storage_options` are s3fs options (`endpoint_url`, `key`, `secret`, `client_kwargs`);
        `local_root` is where an S3 root keeps its local state (default `./.batchyard`);
        `access` the modes of local folders and files (default: owner-only).
        """
        self.access = access or Access()
        self.is_s3 = root.startswith("s3://")
        self._fs_options = dict(storage_options or {})
        if self.is_s3:
            # no listing cache: a listing must see what other processes wrote since
            self._fs_options.setdefault("use_listings_cache", False)
            _redact_in_client_logs(self._fs_options.get("key"), self._fs_options.get("secret"),
                                   self._fs_options.get("token"))
            self.fs = fsspec.filesystem("s3", **self._fs_options)
            self.root = root.rstrip("/")
            base = Path(local_root or ".batchyard").expanduser().resolve()
            self._local = base.joinpath("s3", *[p for p in self.root[len("s3://"):].split("/") if p])
        else:
            self.fs = fsspec.filesystem("file")
            self.root = str(Path(root).expanduser().resolve())
            self.access.makedirs(Path(self.root))
            self._local = Path(self.root)

    @classmethod
    def from_settings(cls, settings: StagingSettings) -> Staging:
        """Open the staging root a `StagingSettings` names."""
        opts: dict[str, Any] = {}
        if settings.root.startswith("s3://"):
            if settings.s3_endpoint_url:
                opts["endpoint_url"] = settings.s3_endpoint_url
            if settings.s3_access_key_id:
                opts["key"] = settings.s3_access_key_id.get_secret_value()
            if settings.s3_secret_access_key:
                opts["secret"] = settings.s3_secret_access_key.get_secret_value()
            if settings.s3_region:
                opts["client_kwargs"] = {"region_name": settings.s3_region}
        return cls(settings.root, storage_options=opts, access=Access.for_group(settings.group))

    def __repr__(self) -> str:  # never show credentials
        return f"Staging({self.root!r})"

    # paths

    def path(self, *parts: str) -> str:
        """Absolute path (or s3 URL) of a path relative to the root."""
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def local_dir(self, *parts: str) -> Path:
        """A local directory for state that cannot live on S3 (created if missing).

        Milvus Lite, the MongoDB stand-in and the embedded Batch API server keep their files
        here. Local root: the root itself. S3 root `s3://bucket/prefix`:
        `<local_root>/s3/bucket/prefix` (default `local_root`: `./.batchyard`, resolved when
        the Staging was opened), so two S3 roots never share local state.
        """
        return self.access.makedirs(self._local.joinpath(*parts))

    def exists(self, rel: str) -> bool:
        """Whether a file exists."""
        return bool(self.fs.exists(self.path(rel)))

    def _ls(self, rel_dir: str) -> list[dict[str, Any]]:
        full = self.path(rel_dir)
        if self.is_s3:
            self.fs.invalidate_cache(full)  # belt and braces: the listing cache is off
        try:
            return list(self.fs.ls(full, detail=True))
        except FileNotFoundError:
            return []

    def list(self, rel_dir: str, suffix: str = "") -> list[str]:
        """Sorted file names (not paths, not sub-directories) in a directory; empty when it does not exist."""
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self._ls(rel_dir) if e["type"] != "directory"]
        return sorted(n for n in names if n.endswith(suffix) and not n.startswith(".tmp-"))

    def list_dirs(self, rel_dir: str) -> builtins.list[str]:
        """Sorted sub-directory names of a directory."""
        names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self._ls(rel_dir) if e["type"] == "directory"]
        return sorted(names)

    # bytes and json

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file atomically."""
        full = self.path(rel)
        if self.is_s3:
            self.fs.pipe_file(full, data)
            return
        self.write_stream(rel, (data,))

    def write_stream(self, rel: str, chunks: Iterable[bytes]) -> None:
        """Write a file atomically from pieces, never holding it whole: local files go through a
        temporary file in the same folder, S3 objects through a local temporary file that is
        uploaded once complete (a failed stream leaves no object)."""
        full = self.path(rel)
        if self.is_s3:
            with tempfile.NamedTemporaryFile(prefix="batchyard-") as tmp:
                for chunk in chunks:
                    tmp.write(chunk)
                tmp.flush()
                self.fs.put_file(tmp.name, full)
            return
        self.access.makedirs(Path(full).parent)
        fd, tmp_path = tempfile.mkstemp(prefix=".tmp-", dir=str(Path(full).parent))
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            self.access.apply(tmp_path)
            os.replace(tmp_path, full)
        except BaseException:
            Path(tmp_path).unlink(missing_ok=True)
            raise

    def read_bytes(self, rel: str) -> bytes:
        """Read a whole file."""
        return bytes(self.fs.cat_file(self.path(rel)))

    def write_json(self, rel: str, obj: Any) -> None:
        """Write JSON atomically (pretty, sorted keys, for audit)."""
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any:
        """Read a JSON file."""
        return json.loads(self.read_bytes(rel))

    def delete(self, rel: str) -> None:
        """Remove a file if it exists."""
        full = self.path(rel)
        if self.fs.exists(full):
            self.fs.rm_file(full)

    # parquet

    def write_parquet(self, rel: str, df: pl.DataFrame) -> None:
        """Write a frame as Parquet (zstd) atomically, in row groups of about 16 MB.

        Polars encodes a whole row group before writing it: with its default (up to 512k rows)
        writing 100k request lines cost 200 MB of transient memory, with 16 MB groups 40 MB.
        """
        rows = _row_group_rows(df)
        if self.is_s3:
            buf = io.BytesIO()
            df.write_parquet(buf, compression="zstd", row_group_size=rows)
            self.write_bytes(rel, buf.getvalue())
            return
        full = Path(self.path(rel))
        self.access.makedirs(full.parent)
        tmp = full.parent / f".tmp-{uuid.uuid4().hex}.parquet"
        try:
            df.write_parquet(tmp, compression="zstd", row_group_size=rows)
            self.access.apply(tmp)
            os.replace(tmp, full)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def read_parquet(self, rel: str) -> pl.DataFrame:
        """Read a Parquet file."""
        if self.is_s3:
            return pl.read_parquet(io.BytesIO(self.read_bytes(rel)))
        return pl.read_parquet(self.path(rel))

    def scan_parquet(self, rels: builtins.list[str], **kwargs: Any) -> pl.LazyFrame:
        """Lazily scan several Parquet files as one frame (on S3 through Polars' own client)."""
        if self.is_s3:
            return pl.scan_parquet([self.path(r) for r in rels], storage_options=self.polars_options(), **kwargs)
        return pl.scan_parquet([self.path(r) for r in rels], **kwargs)

    def count_rows(self, rel: str) -> int:
        """Rows of a Parquet file, from its footer (0 when it does not exist)."""
        if not self.exists(rel):
            return 0
        with self.fs.open(self.path(rel), "rb") as fh:
            return int(pq.ParquetFile(fh).metadata.num_rows)

    def polars_options(self) -> dict[str, str]:
        """`storage_options` for Polars on this S3 root (Polars' names, not s3fs's).

        Polars ignores s3fs's `key`/`secret` silently and would then look for credentials
        elsewhere (environment, instance metadata), so the names are translated here.
        Contains credentials: never log it.
        """
        o = self._fs_options
        out: dict[str, str] = {}
        for ours, theirs in (("endpoint_url", "aws_endpoint_url"), ("key", "aws_access_key_id"),
                             ("secret", "aws_secret_access_key"), ("token", "aws_session_token")):
            if o.get(ours):
                out[theirs] = str(o[ours])
        region = (o.get("client_kwargs") or {}).get("region_name")
        if region:
            out["aws_region"] = str(region)
        if out.get("aws_endpoint_url", "").startswith("http://"):
            out["aws_allow_http"] = "true"
        return out

    @contextmanager
    def parquet_writer(self, rel: str, schema: pl.Schema) -> Iterator[_PageWriter]:
        """Write a Parquet file page by page (flat memory); visible only when the block ends."""
        arrow_schema = pl.DataFrame(schema=schema).to_arrow().schema
        if self.is_s3:
            # spool to a local temporary file (flat memory), upload only once it is complete;
            # s3fs aborts a failed multipart upload, so no object appears on any failure
            with tempfile.TemporaryDirectory(prefix="batchyard-") as tmpdir:
                tmp = Path(tmpdir) / "part.parquet"
                writer = pq.ParquetWriter(str(tmp), arrow_schema, compression="zstd")
                try:
                    page = _PageWriter(writer, arrow_schema)
                    yield page
                finally:
                    writer.close()
                self.fs.put_file(str(tmp), self.path(rel))
            return
        full = Path(self.path(rel))
        self.access.makedirs(full.parent)
        tmp = full.parent / f".tmp-{uuid.uuid4().hex}.parquet"
        writer = pq.ParquetWriter(str(tmp), arrow_schema, compression="zstd")
        try:
            page = _PageWriter(writer, arrow_schema)
            yield page
            writer.close()
            self.access.apply(tmp)
            os.replace(tmp, full)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise


class _PageWriter:
    def __init__(self, writer: pq.ParquetWriter, schema: pa.Schema) -> None:
        self._writer = writer
        self._schema = schema
        self.rows = 0

    def write(self, df: pl.DataFrame) -> None:
        if df.height:
            self._writer.write_table(df.to_arrow().cast(self._schema))
            self.rows += df.height
