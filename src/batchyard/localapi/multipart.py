"""A small `multipart/form-data` parser (the Files upload), so the server needs no extra package."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

_PARAM = re.compile(r';\s*([\w*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


@dataclass(frozen=True)
class FormFile:
    """An uploaded file part."""

    filename: str
    content: bytes
    content_type: str | None


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """Split a header value like `form-data; name="file"; filename="a.jsonl"` into parts."""
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for key, raw in _PARAM.findall(";" + rest):
        val = raw.strip()
        if val.startswith('"') and val.endswith('"'):
            val = re.sub(r"\\(.)", r"\1", val[1:-1])
        key = key.lower()
        if key.endswith("*"):  # RFC 5987: filename*=utf-8''na%C3%AFve.jsonl
            _, _, encoded = val.partition("''")
            key, val = key[:-1], unquote(encoded or val)
        params[key] = val
    return main.strip().lower(), params


def parse_form(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, FormFile]]:
    """Parse a multipart body into (text fields, file fields). Raises ValueError when malformed."""
    kind, params = header_params(content_type)
    if kind != "multipart/form-data" or not params.get("boundary"):
        raise ValueError("expected a multipart/form-data body with a boundary")
    delimiter = b"--" + params["boundary"].encode("latin-1")
    fields: dict[str, str] = {}
    files: dict[str, FormFile] = {}
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise ValueError("multipart body has no parts")
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # closing delimiter
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("multipart part without headers")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        headers: dict[str, str] = {}
        for raw_line in head.split(b"\r\n"):
            name, _, value = raw_line.decode("utf-8", "replace").partition(":")
            headers[name.strip().lower()] = value.strip()
        _, disp = header_params(headers.get("content-disposition", ""))
        name = disp.get("name")
        if name is None:
            continue
        if "filename" in disp:
            files[name] = FormFile(disp["filename"], data, headers.get("content-type"))
        else:
            fields[name] = data.decode("utf-8", "replace")
    return fields, files
