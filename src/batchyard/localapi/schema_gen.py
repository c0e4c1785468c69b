"""Deterministic JSON values that satisfy a JSON schema (the subset Structured Outputs uses).

Handles object/properties/required/additionalProperties, array (items, prefixItems, minItems,
maxItems, uniqueItems), string (enum, const, minLength, maxLength, a few formats), integer and
number (minimum, maximum, exclusive bounds, multipleOf), boolean, null, type lists,
anyOf/oneOf/allOf and `$ref` into `$defs`/`definitions`. `pattern` is not honoured.
Strings are built from words of the request's own text, so outputs read like the input.
"""

from __future__ import annotations

import math
import random
import re
from typing import Any

MAX_DEPTH = 8
"""Past this nesting depth, optional parts are left out and recursive branches avoided."""

_FALLBACK_WORDS = [
    "batch",
    "quick",
    "summary",
    "local",
    "answer",
    "value",
    "sample",
    "record",
    "item",
    "detail",
    "note",
    "topic",
    "result",
    "context",
    "field",
    "entry",
    "report",
]
_WORD = re.compile(r"[^\W\d_]{2,}")


def words_from(text: str) -> list[str]:
    """Lower-case words of `text` (letters only), or a fixed fallback list when it has none."""
    found = [w.lower() for w in _WORD.findall(text)]
    return found or list(_FALLBACK_WORDS)


class SchemaValueGenerator:
    """Generates one value valid against `schema`, drawing randomness from `rng`."""

    def __init__(self, schema: dict[str, Any] | bool, rng: random.Random, words: list[str]) -> None:
        self.root = schema if isinstance(schema, dict) else {}
        self.schema = schema
        self.rng = rng
        self.words = words or list(_FALLBACK_WORDS)

    def generate(self) -> Any:
        """A value valid against the root schema."""
        return self.value(self.schema, 0)

    # ------------------------------------------------------------------ dispatch
    def resolve(self, schema: Any) -> Any:
        """Follow `$ref` pointers (`#/...`) until a schema without `$ref`, merging siblings."""
        seen = 0
        while isinstance(schema, dict) and "$ref" in schema and seen < 64:
            target = self._pointer(schema["$ref"])
            siblings = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **siblings} if siblings and isinstance(target, dict) else target
            seen += 1
        return schema

    def _pointer(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}
        node: Any = self.root
        for part in ref.lstrip("#").strip("/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part, {}) if isinstance(node, dict) else {}
        return node

    def value(self, schema: Any, depth: int) -> Any:
        """A value valid against `schema` at nesting `depth`."""
        schema = self.resolve(schema)
        if schema is True or schema is None or schema == {}:
            return self._phrase(1, 4)
        if schema is False:
            return None
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return self.rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if schema.get(key):
                return self.value(self._pick_branch(schema[key], depth), depth)
        if schema.get("allOf"):
            merged = self._merge_all_of(schema)
            return self.value(merged, depth)
        typ = self._pick_type(schema, depth)
        return getattr(self, f"_gen_{typ}", self._gen_string)(schema, depth)

    def _pick_branch(self, branches: list[Any], depth: int) -> Any:
        if depth >= MAX_DEPTH:
            simple = [b for b in branches if self._is_terminal(b)]
            if simple:
                return simple[0]
        non_null = [b for b in branches if self.resolve(b) != {"type": "null"}]
        if non_null and self.rng.random() < 0.85:
            return self.rng.choice(non_null)
        return self.rng.choice(branches)

    def _is_terminal(self, schema: Any) -> bool:
        schema = schema if isinstance(schema, dict) else {}
        if "$ref" in schema:
            return False
        return (
            schema.get("type") in ("null", "string", "integer", "number", "boolean")
            or "enum" in schema
        )

    def _merge_all_of(self, schema: dict[str, Any]) -> dict[str, Any]:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = self.resolve(part)
            if not isinstance(part, dict):
                continue
            for k, v in part.items():
                if k == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **v}
                elif k == "required":
                    merged["required"] = sorted(set(merged.get("required", [])) | set(v))
                else:
                    merged.setdefault(k, v)
        return merged

    def _pick_type(self, schema: dict[str, Any], depth: int) -> str:
        typ = schema.get("type")
        if isinstance(typ, list):
            options = [t for t in typ if t != "null"] or ["null"]
            if "null" in typ and (depth >= MAX_DEPTH or self.rng.random() < 0.15):
                return "null"
            return self.rng.choice(options)
        if isinstance(typ, str):
            return typ
        if "properties" in schema or "additionalProperties" in schema:
            return "object"
        if "items" in schema or "prefixItems" in schema:
            return "array"
        return "string"

    # ------------------------------------------------------------------ types
    def _gen_null(self, schema: dict[str, Any], depth: int) -> None:
        return None

    def _gen_boolean(self, schema: dict[str, Any], depth: int) -> bool:
        return self.rng.random() < 0.5

    def _gen_object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        props: dict[str, Any] = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if name in required or (depth < MAX_DEPTH and self.rng.random() < 0.5):
                out[name] = self.value(sub, depth + 1)
        for name in sorted(required - set(props)):
            out[name] = self._phrase(1, 3)
        extra = schema.get("additionalProperties")
        if not props and isinstance(extra, dict) and depth < MAX_DEPTH:
            for _ in range(self.rng.randint(1, 2)):
                out[self.rng.choice(self.words)] = self.value(extra, depth + 1)
        return out

    def _gen_array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        lo = int(schema.get("minItems", 0))
        hi = schema.get("maxItems")
        prefix = schema.get("prefixItems") or []
        items = schema.get("items", {})
        if depth >= MAX_DEPTH:
            n = max(lo, len(prefix) if lo else 0)
        else:
            default_hi = max(lo, 3)
            n = self.rng.randint(max(lo, 1 if hi != 0 else 0), default_hi)
        if hi is not None:
            n = min(n, int(hi))
        out: list[Any] = []
        attempts = 0
        while len(out) < n and attempts < n * 20 + 20:
            attempts += 1
            sub = prefix[len(out)] if len(out) < len(prefix) else items
            val = self.value(sub if sub is not None else {}, depth + 1)
            if schema.get("uniqueItems") and val in out:
                continue
            out.append(val)
        return out

    def _gen_integer(self, schema: dict[str, Any], depth: int) -> int:
        lo, hi = self._bounds(schema, integer=True)
        mult = schema.get("multipleOf")
        if isinstance(mult, int) and mult > 0:
            first, last = math.ceil(lo / mult), math.floor(hi / mult)
            if first <= last:
                return self.rng.randint(first, last) * mult
        return self.rng.randint(int(lo), int(hi))

    def _gen_number(self, schema: dict[str, Any], depth: int) -> float | int:
        lo, hi = self._bounds(schema, integer=False)
        mult = schema.get("multipleOf")
        if isinstance(mult, (int, float)) and mult > 0:
            first, last = math.ceil(lo / mult), math.floor(hi / mult)
            if first <= last:
                return self.rng.randint(first, last) * mult
        val = round(self.rng.uniform(lo, hi), 2)
        return min(max(val, lo), hi)

    def _bounds(self, schema: dict[str, Any], *, integer: bool) -> tuple[float, float]:
        step = 1 if integer else 0.01
        lo = schema.get("minimum")
        hi = schema.get("maximum")
        if isinstance(schema.get("exclusiveMinimum"), (int, float)) and not isinstance(
            schema.get("exclusiveMinimum"), bool
        ):
            lo = schema["exclusiveMinimum"] + step
        if isinstance(schema.get("exclusiveMaximum"), (int, float)) and not isinstance(
            schema.get("exclusiveMaximum"), bool
        ):
            hi = schema["exclusiveMaximum"] - step
        if lo is None and hi is None:
            lo, hi = 0, 100
        elif lo is None:
            assert hi is not None
            lo = hi - 100
        elif hi is None:
            hi = lo + 100
        assert lo is not None and hi is not None
        if integer:
            lo, hi = math.ceil(lo), math.floor(hi)
        return (lo, hi) if lo <= hi else (lo, lo)

    def _gen_string(self, schema: dict[str, Any], depth: int) -> str:
        fmt = schema.get("format")
        r = self.rng
        if fmt == "date-time":
            return f"2024-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}T{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:00Z"
        if fmt == "date":
            return f"2024-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
        if fmt == "time":
            return f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:00"
        if fmt == "email":
            return f"{r.choice(self.words)}@example.com"
        if fmt in ("uri", "url"):
            return f"https://example.com/{r.choice(self.words)}"
        if fmt == "uuid":
            h = f"{r.getrandbits(128):032x}"
            return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"
        lo = int(schema.get("minLength", 0))
        hi = schema.get("maxLength")
        text = self._phrase(2, 8)
        while len(text) < lo:
            text += " " + self._phrase(1, 4)
        if hi is not None and len(text) > int(hi):
            text = text[: int(hi)].rstrip().ljust(min(lo, int(hi)), "x")
        return text

    def _phrase(self, lo: int, hi: int) -> str:
        n = self.rng.randint(lo, hi)
        start = self.rng.randrange(len(self.words))
        picked = [self.words[(start + i) % len(self.words)] for i in range(n)]
        return " ".join(picked)


def generate_value(schema: dict[str, Any] | bool, rng: random.Random, words: list[str]) -> Any:
    """A value valid against `schema` (see module docstring for the supported subset)."""
    return SchemaValueGenerator(schema, rng, words).generate()


def violate(value: Any, schema: dict[str, Any]) -> Any:
    """A variant of a valid `value` that breaks `schema` (drops a required field, or wrong type)."""
    gen = SchemaValueGenerator(schema, random.Random(0), [])
    resolved = gen.resolve(schema)
    if isinstance(value, dict) and isinstance(resolved, dict):
        required = [k for k in resolved.get("required") or [] if k in value]
        if required:
            broken = dict(value)
            del broken[required[0]]
            return broken
        return (
            {**value, "__unexpected__": True}
            if resolved.get("additionalProperties") is False
            else 12345
        )
    return (
        12345 if not isinstance(value, (int, float)) or isinstance(value, bool) else "not a number"
    )
