"""Checks of where settings come from, before pydantic-settings reads them (pure logic).

Why: pydantic-settings ignores a variable it does not know (the partition cap's variable spelt
without its final S ran with the 100,000 default and exited 0), stops with a 76-line traceback on
a list or dict setting that is not JSON, and puts the whole input, secrets included, into its
validation errors. So before the settings are built, every `BATCHYARD_` name of the environment
and of the env files is checked against the settings tree (the nearest valid name is suggested),
and every value of a list, dict or group setting must parse as JSON. Afterwards, a validation
error is described by where it is and what is wrong, never by the value: a value may be a key,
or a key pasted into the wrong setting.

Only names of variables are ever shown, never their values.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

PREFIX = "BATCHYARD_"
DELIMITER = "__"

NOT_SETTINGS = frozenset({
    "BATCHYARD_PROFILE_DIR",  # where profiles are looked for (settings.profile_dirs)
    "BATCHYARD_HOME",  # profiles under $BATCHYARD_HOME/profiles (settings.profile_dirs)
    "BATCHYARD_CRASH_AT",  # the crash tests' kill point (crash.py)
    "BATCHYARD_TOKEN_WORKERS",  # processes that count tokens (tokens.py)
})
"""`BATCHYARD_` variables that batchyard reads itself and that are not settings: the one list of
names an unknown-setting check lets through (plus the prefixes below)."""
NOT_SETTINGS_PREFIXES = ("BATCHYARD_TEST_",)
"""Prefixes of variables the test suite reads (e.g. `BATCHYARD_TEST_MONGO_URI`)."""


@dataclass(frozen=True)
class SettingNames:
    """The environment names of a settings tree."""

    exact: dict[str, str]
    """Upper-case variable name -> dotted setting path, for every group and field."""
    structured: frozenset[str]
    """Names whose value is JSON (lists, dicts and groups)."""
    open_prefixes: tuple[str, ...]
    """Names of dict settings: any `<name>__<key>` below them is valid too."""


def _unwrap(annotation: Any) -> list[Any]:
    """The types an annotation allows (Optional and unions split, Annotated unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) for t in _unwrap(a)]
    return [annotation]


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _is_container(t: Any) -> bool:
    return typing.get_origin(t) in (list, dict, set, frozenset, tuple) or t in (list, dict, set, tuple)


def setting_names(model: type[BaseModel], prefix: str = PREFIX) -> SettingNames:
    """Every environment name of `model`'s fields, nested groups included (`A__B__C`)."""
    exact: dict[str, str] = {}
    structured: set[str] = set()
    open_prefixes: list[str] = []

    def walk(m: type[BaseModel], env: str, path: str) -> None:
        for name, field in m.model_fields.items():
            var, dotted = f"{env}{name}".upper(), f"{path}{name}"
            exact[var] = dotted
            kinds = _unwrap(field.annotation)
            if any(_is_model(t) or _is_container(t) for t in kinds):
                structured.add(var)
            if any(typing.get_origin(t) is dict or t is dict for t in kinds):
                open_prefixes.append(var + DELIMITER)
            for t in kinds:
                if _is_model(t):
                    walk(t, var + DELIMITER, dotted + ".")

    walk(model, prefix, "")
    return SettingNames(exact, frozenset(structured), tuple(open_prefixes))


def is_batchyard_name(name: str) -> bool:
    """True for a variable in batchyard's namespace (`BATCHYARD_...`, any case)."""
    return name.upper().startswith(PREFIX)


def allowed_non_setting(name: str) -> bool:
    """True for a `BATCHYARD_` variable batchyard reads that is not a setting."""
    upper = name.upper()
    return upper in NOT_SETTINGS or upper.startswith(NOT_SETTINGS_PREFIXES)


def nearest(name: str, names: Iterable[str]) -> str | None:
    """The valid name closest to a misspelt one, if any is close."""
    tails = {n[len(PREFIX):]: n for n in names if n.startswith(PREFIX)}  # the shared prefix is no evidence
    found = difflib.get_close_matches(name.upper().removeprefix(PREFIX), list(tails), n=1, cutoff=0.75)
    return tails[found[0]] if found else None


def check_source(names: SettingNames, values: Mapping[str, str | None], where: str, *,
                 only_prefixed: bool = True) -> list[str]:
    """Problems of one source of settings (the environment, or one env file), one line each.

    A name outside `BATCHYARD_` is skipped when `only_prefixed` (the environment and `./.env`
    hold other programs' variables too), else reported (a profile holds batchyard settings
    only). Values are never quoted.
    """
    problems: list[str] = []
    for raw_name, value in values.items():
        name = raw_name.upper()
        if not name.startswith(PREFIX):
            if not only_prefixed:
                problems.append(f"{raw_name} in {where} is not a batchyard setting "
                                f"(settings start with {PREFIX}, e.g. {PREFIX}STAGING__ROOT)")
            continue
        if allowed_non_setting(name):
            continue
        if name in names.exact:
            if name in names.structured and value not in (None, "") and not _is_json(value):
                problems.append(f"{raw_name} in {where} is not valid JSON: {names.exact[name]} is a "
                                f"{_kind(names, name)}, e.g. {raw_name}={_example(names, name)}")
            continue
        if any(name.startswith(p) and len(name) > len(p) for p in names.open_prefixes):
            continue
        guess = nearest(name, names.exact)
        hint = f"did you mean {guess}?" if guess else "see `batchyard config show` for the settings"
        problems.append(f"unknown setting {raw_name} in {where}: {hint}")
    return problems


def _is_json(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _kind(names: SettingNames, name: str) -> str:
    if any(name + DELIMITER == p for p in names.open_prefixes):
        return "JSON object"
    if any(n.startswith(name + DELIMITER) for n in names.exact):
        return "group (a JSON object)"
    return "JSON list"


def _example(names: SettingNames, name: str) -> str:
    return "'[\"...\"]'" if _kind(names, name) == "JSON list" else "'{\"...\": ...}'"


def describe(exc: ValidationError, names: SettingNames | None = None) -> str:
    """One line for a settings validation error: where (dotted path and variable) and what.

    Never the input: pydantic puts the value, or for a check across fields the whole settings
    tree with every secret in it, into its errors.
    """
    first = exc.errors(include_input=False, include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ())]
    where = ".".join(loc)
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if not where:
        return f"invalid settings: {msg}{more}"
    var = _variable_of(loc, names)
    return f"invalid setting {where}" + (f" ({var})" if var else "") + f": {msg}{more}"


def _variable_of(loc: list[str], names: SettingNames | None) -> str | None:
    """The variable that sets the deepest known setting on the path `loc` (an item of a list
    or a key of a dict is set by its setting's variable)."""
    if names is None:
        return None
    for end in range(len(loc), 0, -1):
        var = PREFIX + DELIMITER.join(loc[:end]).upper()
        if var in names.exact:
            return var
    return None
