"""Prompt templates: Markdown files with a `## system` and a `## user` section.

File format (UTF-8)::

    # Anything before the first section is a note for maintainers; it is not sent.
    ## system
    You are ...
    ## user
    Company: {{company_id}}
    {{text}}

- The section headers are lines that read exactly `## system` and `## user` (trailing spaces
  allowed), once each, system first. Other Markdown (including other `##` headings) is text.
- What is sent is each section's text without maintainer comments (`<!-- ... -->`; a line that
  holds only a comment goes with it), without trailing whitespace on its lines, with runs of
  blank lines cut to one, and stripped at both ends. So notes, comments and such whitespace
  never reach the model, and never change the task version (`InferenceTask.task_version`).
- Placeholders are `{{text}}`, `{{company_id}}` and `{{document_id}}` (spaces inside the braces
  are allowed). Any other `{{...}}`, or a `{{` that is never closed, is a `ConfigError` at load
  time naming the file and the placeholder. A template has no escape for a literal `{{`.

The template is split into literal pieces and placeholder names once, at load time. Rendering
only concatenates: values are inserted verbatim and never parsed, so chunk text containing
`{name}`, `{{ x }}`, `{% ... %}`, `$var` or even `{{text}}` reaches the model unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from batchyard.errors import ConfigError

TPlaceholder = Literal["text", "company_id", "document_id"]
PLACEHOLDERS: frozenset[str] = frozenset({"text", "company_id", "document_id"})

_SECTION = re.compile(r"^##[ \t]+(system|user)[ \t]*$", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_COMMENT_LINE = re.compile(r"^[ \t]*<!--.*?-->[ \t]*(?:\n|\Z)", re.MULTILINE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")


class PromptError(ConfigError):
    """A prompt file is missing or malformed."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"prompt file {path}: {reason}")


@dataclass(frozen=True, slots=True)
class Placeholder:
    """A named slot in a template, filled from the unit column of the same name."""

    name: str


TPiece = str | Placeholder


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    """A parsed prompt file: each section as a tuple of literal strings and placeholders."""

    path: str
    system: tuple[TPiece, ...]
    user: tuple[TPiece, ...]

    @property
    def placeholders(self) -> frozenset[str]:
        """Names of the placeholders used in either section."""
        return frozenset(p.name for p in (*self.system, *self.user) if isinstance(p, Placeholder))

    def render(self, values: dict[str, str]) -> tuple[str, str]:
        """(system, user) for one unit, by plain concatenation (for previews and tests)."""
        return _render(self.system, values), _render(self.user, values)

    def system_json(self) -> list[str | pl.Expr]:
        """The system message as JSON string fragments (see `json_fragments`)."""
        return json_fragments(self.system)

    def user_json(self) -> list[str | pl.Expr]:
        """The user message as JSON string fragments (see `json_fragments`)."""
        return json_fragments(self.user)


def _render(pieces: tuple[TPiece, ...], values: dict[str, str]) -> str:
    return "".join(p if isinstance(p, str) else (values.get(p.name) or "") for p in pieces)


def json_escaped(value: pl.Expr) -> pl.Expr:
    """A string column JSON-escaped, without the surrounding quotes (nulls become empty).

    Uses Polars' own JSON encoder on a one-field struct and strips the `{"v":"` and `"}` around
    the value. JSON escaping works character by character, so escaped pieces concatenate into
    the escaped whole.
    """
    encoded = pl.struct(value.cast(pl.String).fill_null("").alias("v")).struct.json_encode()
    return encoded.str.slice(6).str.strip_suffix('"}')


def json_fragments(pieces: tuple[TPiece, ...]) -> list[str | pl.Expr]:
    """A section as the pieces of one JSON string literal, quotes included.

    Literal text is escaped once in Python; placeholders become `json_escaped` columns.
    Adjacent literals are merged, so the list alternates str / Expr. Concatenating the
    fragments (`pl.concat_str`) gives a valid JSON string whose value is the rendered section.
    """
    out: list[str | pl.Expr] = ['"']
    for piece in pieces:
        if isinstance(piece, str):
            escaped = json.dumps(piece, ensure_ascii=False)[1:-1]
            if isinstance(out[-1], str):
                out[-1] += escaped
            else:
                out.append(escaped)
        else:
            out.append(json_escaped(pl.col(piece.name)))
    if isinstance(out[-1], str):
        out[-1] += '"'
    else:
        out.append('"')
    return out


def split_template(source: str, path: str = "<string>") -> tuple[TPiece, ...]:
    """Split one section's text into literal pieces and placeholders.

    Raises:
        PromptError: an unknown placeholder or an unclosed `{{`.
    """
    pieces: list[TPiece] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(source):
        name = m.group(1).strip()
        if name not in PLACEHOLDERS:
            raise PromptError(
                path,
                f"unknown placeholder {m.group(0)!r}; allowed: "
                + ", ".join(f"{{{{{n}}}}}" for n in sorted(PLACEHOLDERS)),
            )
        if m.start() > pos:
            pieces.append(source[pos : m.start()])
        pieces.append(Placeholder(name))
        pos = m.end()
    if pos < len(source):
        pieces.append(source[pos:])
    for piece in pieces:
        if isinstance(piece, str) and "{{" in piece:
            snippet = piece[piece.index("{{") :][:40]
            raise PromptError(path, f"unclosed placeholder starting at {snippet!r}")
    return tuple(pieces)


def sent_text(section: str, path: str = "<string>") -> str:
    """A section's text as it is sent: comments, trailing whitespace and extra blank lines removed.

    Raises:
        PromptError: a `<!--` that is never closed.
    """
    text = _COMMENT.sub("", _COMMENT_LINE.sub("", section))
    if "<!--" in text:
        snippet = text[text.index("<!--") :][:40]
        raise PromptError(path, f"unclosed comment starting at {snippet!r}")
    return _BLANK_LINES.sub("\n\n", _TRAILING_SPACE.sub("", text)).strip()


def parse_prompt(source: str, path: str = "<string>") -> PromptTemplate:
    """Parse the text of a prompt file.

    Raises:
        PromptError: sections missing, repeated or out of order; bad placeholders.
    """
    heads = list(_SECTION.finditer(source))
    names = [m.group(1) for m in heads]
    if names != ["system", "user"]:
        found = ", ".join(f"'## {n}'" for n in names) or "none"
        raise PromptError(
            path, f"needs one '## system' line followed by one '## user' line (found: {found})"
        )
    system = sent_text(source[heads[0].end() : heads[1].start()], path)
    user = sent_text(source[heads[1].end() :], path)
    if not user:
        raise PromptError(path, "the '## user' section is empty")
    return PromptTemplate(
        path=path, system=split_template(system, path), user=split_template(user, path)
    )


def prompt_path(prompts_dir: str | Path, relative: str) -> Path:
    """Absolute path of a task's prompt file; it must stay inside `prompts_dir`.

    Raises:
        PromptError: the path escapes the prompts directory or does not exist.
    """
    root = Path(prompts_dir).expanduser().resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise PromptError(str(path), f"outside the prompts directory {root}")
    if not path.is_file():
        raise PromptError(str(path), "does not exist")
    return path


def load_prompt(prompts_dir: str | Path, relative: str) -> PromptTemplate:
    """Read and parse a prompt file (universal newlines, UTF-8)."""
    path = prompt_path(prompts_dir, relative)
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(str(path), f"not valid UTF-8 ({exc})") from exc
    return parse_prompt(source, str(path))


def resolve_prompts_dir(setting: str) -> Path:
    """The prompts directory: the setting if given, else `./prompts`, else the repo's `prompts/`."""
    if setting:
        return Path(setting).expanduser()
    local = Path("prompts")
    if local.is_dir():
        return local.resolve()
    return Path(__file__).resolve().parents[3] / "prompts"
