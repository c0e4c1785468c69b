"""The stand-in's index checkpoint: its in-memory indexes saved beside the file, so an open
does not read every record.

Why. Opening the log file reads every record to rebuild the indexes: about 6-8 s at 1M chunks,
too slow to open the stand-in per operation, as processes taking turns with it must. The
checkpoint (`<file>.idx`) holds, per collection, the ids in natural order, their blob
references, the sorted `_id` index (as positions) and each field index (values, bucket sizes,
members as positions): numbers in packed arrays, values in msgpack (msgspec). Loading it builds
the same structures from columns, several times faster than parsing 1M records.

Validity. A checkpoint describes the file up to one commit: it names the file's `file_id` (a
random id in the header, new at every rewrite), the offset where that commit ends, and the
16-byte trailer that ends it. The file is append-only between rewrites, so when the id matches
and the file still holds those trailer bytes at that offset, every record before it is what the
checkpoint saw; the records after it are replayed as usual. Anything else (another file, a
rewrite, a torn or corrupt checkpoint: a CRC covers it) is ignored and the file is read whole.
It is written with a temporary file and `os.replace`, never fsynced: losing it costs one slow open.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zlib
from array import array
from pathlib import Path
from typing import Any

import bson
import msgspec
from bson import ObjectId

from batchyard.clients.standin import store_key
from batchyard.storage.perms import fit_to_folder

FORMAT = "batchyard-mongo-standin-index"
VERSION = 1
_NATIVE = frozenset({str, int, float, bool, type(None)})
# msgpack extension codes: ObjectId (12 bytes), a dict id (as mongomock keys it), any other value
_OID, _BSON, _DICT = 1, 2, 3  # (the last two as BSON {"v": value})
_MAGIC = b"BYIX"


def path_for(data_path: Path) -> Path:
    return data_path.with_name(data_path.name + ".idx")


def _pack_value(value: Any) -> Any:
    if type(value) is ObjectId:
        return msgspec.msgpack.Ext(_OID, value.binary)
    return msgspec.msgpack.Ext(_DICT if isinstance(value, dict) else _BSON, bson.encode({"v": value}))


def _pack(values: list[Any]) -> list[Any]:
    """Values msgpack keeps exactly as they are, the others as extensions (dates stay naive)."""
    if all(type(v) in _NATIVE for v in values):
        return values
    return [v if type(v) in _NATIVE else _pack_value(v) for v in values]


def _unpack_ext(code: int, data: memoryview) -> Any:
    if code == _OID:
        return ObjectId(bytes(data))
    if code == _BSON:
        return bson.decode(bytes(data))["v"]
    if code == _DICT:
        return store_key(bson.decode(bytes(data))["v"])
    raise ValueError(f"unknown extension {code}")


def _ints(values: array[int], typecode: str) -> bytes:
    return (values if values.typecode == typecode else array(typecode, values)).tobytes()


def _from_ints(data: bytes, typecode: str) -> array[int]:
    """Packed integers, kept packed: indexes built later index into them."""
    out = array(typecode)
    out.frombytes(data)
    return out


def encode(identity: dict[str, Any], collections: dict[str, dict[str, Any]]) -> bytes:
    """The checkpoint bytes of `identity` (file id, end, trailer, accounting) and each
    collection's `IndexedCollectionStore.export_state()`."""
    cols: dict[str, Any] = {}
    for name, state in collections.items():
        cols[name] = {
            "ids": _pack(state["ids"]),
            "refs": _ints(state["refs"], "Q"),
            "sorted": {str(b): _ints(pos, "q") for b, pos in state["sorted"].items()},
            "others": _ints(state["others"], "q"),
            "fields": {
                path: {
                    "values": _pack(f["values"]),
                    "sizes": _ints(f["sizes"], "q"),
                    "members": _ints(f["members"], "q"),
                    "irregular": _ints(f["irregular"], "q"),
                }
                for path, f in state["fields"].items()
            },
        }
    body = msgspec.msgpack.encode({"format": FORMAT, "version": VERSION, **identity, "collections": cols})
    return _MAGIC + zlib.crc32(body).to_bytes(4, "little") + body


def decode(blob: bytes) -> dict[str, Any] | None:
    """The identity and per-collection states of a checkpoint (None: not a valid checkpoint)."""
    if len(blob) < 8 or blob[:4] != _MAGIC or zlib.crc32(memoryview(blob)[8:]) != int.from_bytes(blob[4:8], "little"):
        return None
    try:
        data = msgspec.msgpack.decode(memoryview(blob)[8:], ext_hook=_unpack_ext)
    except (msgspec.DecodeError, ValueError, bson.errors.BSONError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        return None
    out: dict[str, Any] = {}
    for name, col in data["collections"].items():
        out[name] = {
            "ids": col["ids"],
            "refs": _from_ints(col["refs"], "Q"),
            "sorted": {int(b): _from_ints(pos, "q") for b, pos in col["sorted"].items()},
            "others": _from_ints(col["others"], "q"),
            "fields": {
                path: {
                    "values": f["values"],
                    "sizes": _from_ints(f["sizes"], "q"),
                    "members": _from_ints(f["members"], "q"),
                    "irregular": _from_ints(f["irregular"], "q"),
                }
                for path, f in col["fields"].items()
            },
        }
    data["collections"] = out
    return data


def read(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, decoded (None: missing or invalid)."""
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    return decode(blob)


def write(path: Path, blob: bytes) -> None:
    """Replace the checkpoint atomically (a crash leaves the old one or none: both are safe)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        fit_to_folder(tmp)  # staging's access (owner-only, or the group's)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


__all__ = ["FORMAT", "VERSION", "decode", "encode", "path_for", "read", "write"]
