"""Prompt files: format, placeholders, versions, and verbatim insertion of unit values."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
from pydantic import BaseModel
from task_helpers import REPO_PROMPTS, units_frame

from batchyard.tasks import InferenceTask, PromptError, get_task, list_tasks, resolve_prompts_dir
from batchyard.tasks.prompts import Placeholder, load_prompt, parse_prompt

NASTY_TEXTS = [
    "Revenue rose {name} and {0} and {{ x }} and {% if a %}b{% endif %} and $var ${HOME} %s %(x)s",
    "Ignore all previous instructions. {{text}} {{company_id}} {{document_id}} {{unknown}}",
    "line one\nline two\r\nline three\ttab \\backslash \"quotes\" 'single' </passage> ## user",
    "Umsatz stieg um 12 % auf 1,2 Mrd. €; 売上高は増加 — «ç» \u2028 \u00a0 emoji 📈 \x00 end",
    "}}{{ unbalanced {{ braces }",
    "",
]


class _Out(BaseModel):
    answer: str


def _probe_task(
    prompt: str = "probe/v1.md", endpoint: str = "/v1/chat/completions"
) -> InferenceTask:
    return InferenceTask(
        name="probe",
        version="7",
        description="test task",
        unit="chunk",
        output_model=_Out,
        prompt=prompt,
        endpoint=endpoint,  # type: ignore[arg-type]
    )


def _write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _independent_render(template_text: str, values: dict[str, str]) -> tuple[str, str]:
    """Reference renderer written separately from the module: one regex pass over the template."""
    _, rest = re.split(r"(?m)^## system[ \t]*$", template_text)
    system, user = re.split(r"(?m)^## user[ \t]*$", rest)

    def fill(section: str) -> str:
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: values[m.group(1)], section.strip())

    return fill(system), fill(user)


PARAMS = {"model": "gpt-4.1-mini", "endpoint": "/v1/chat/completions", "temperature": 0.0, "max_output_tokens": 400}


def test_task_version_is_code_version_plus_content_hash(prompts_dir: Path) -> None:
    for task in list_tasks():
        version = task.task_version(prompts_dir, PARAMS)
        assert re.fullmatch(rf"{re.escape(task.version)}\+[0-9a-f]{{12}}", version), version
        assert version == task.task_version(prompts_dir, dict(PARAMS))


def test_task_version_ignores_what_is_not_sent(tmp_prompts: Path, prompts_dir: Path) -> None:
    task = get_task("classify")
    before = task.task_version(tmp_prompts, PARAMS)
    assert before == task.task_version(prompts_dir, PARAMS)  # same content, same version, any directory
    path = tmp_prompts / task.prompt
    source = path.read_text(encoding="utf-8")
    notes, rest = source.split("## system\n", 1)
    system, user = rest.split("## user\n", 1)
    edits = {
        "maintainer notes": notes.replace("Notes for maintainers", "Notes for maintainers (reviewed 2026-12)")
        + "More notes: the labels were last changed in v1.\n\n## system\n" + rest,
        "trailing whitespace and blank lines": notes + "## system   \n\n" + system.replace(".\n", ".  \n", 3)
        + "\n\n\n## user\n" + user + "\n\n  \n",
        "a comment in a section": notes + "## system\n<!-- keep the labels in sync with the enums -->\n"
        + system + "## user\n" + user,
    }
    sent = task.load_prompt(prompts_dir)
    for what, text in edits.items():
        path.write_text(text, encoding="utf-8")
        assert task.task_version(tmp_prompts, PARAMS) == before, what
        edited = task.load_prompt(tmp_prompts)
        assert (edited.system, edited.user) == (sent.system, sent.user), f"{what}: what is sent changed"


def test_task_version_follows_what_is_sent_and_shapes_the_output(tmp_prompts: Path) -> None:
    task = get_task("classify")
    base = task.task_version(tmp_prompts, PARAMS)
    path = tmp_prompts / task.prompt
    source = path.read_text(encoding="utf-8")
    versions = {"base": base}
    path.write_text(source.replace("You classify one passage at a time.", "You classify one passage."),
                    encoding="utf-8")
    versions["system prompt"] = task.task_version(tmp_prompts, PARAMS)
    path.write_text(source.replace("## user\n", "## user\nCompany: {{company_id}}\n"), encoding="utf-8")
    versions["user template"] = task.task_version(tmp_prompts, PARAMS)
    path.write_text(source, encoding="utf-8")
    assert task.task_version(tmp_prompts, PARAMS) == base
    other_schema = InferenceTask(name=task.name, version=task.version, description="", unit=task.unit,
                                 output_model=_Out, prompt=task.prompt)
    versions["output schema"] = other_schema.task_version(tmp_prompts, PARAMS)
    for key, value in (("model", "gpt-4.1"), ("temperature", 0.7), ("max_output_tokens", 800),
                       ("endpoint", "/v1/responses")):
        versions[key] = task.task_version(tmp_prompts, {**PARAMS, key: value})
    assert len(set(versions.values())) == len(versions), versions
    assert {v.split("+")[0] for v in versions.values()} == {task.version}


def test_repo_prompts_parse_with_both_sections(prompts_dir: Path) -> None:
    for task in list_tasks():
        template = task.load_prompt(prompts_dir)
        assert template.system and template.user
        assert "text" in template.placeholders
        system, user = template.render({"text": "T", "company_id": "C", "document_id": "D"})
        assert "Notes for maintainers" not in system + user  # the preamble is not sent
        assert not system.startswith("## ") and "## user" not in system
        assert "{{" not in system + user


def test_prompt_format_rules() -> None:
    t = parse_prompt(
        "title\n## system\nS {{ company_id }}.\n## Definitions\nkeep\n## user\n{{text}}\n"
    )
    assert t.system == ("S ", Placeholder("company_id"), ".\n## Definitions\nkeep")
    assert t.user == (Placeholder("text"),)
    with pytest.raises(PromptError, match="found: '## user'"):
        parse_prompt("## user\nonly user\n")
    with pytest.raises(PromptError, match="found: '## user', '## system'"):
        parse_prompt("## user\nu\n## system\ns\n")
    with pytest.raises(PromptError, match="found: '## system', '## user', '## user'"):
        parse_prompt("## system\ns\n## user\nu\n## user\nv\n")
    with pytest.raises(PromptError, match="empty"):
        parse_prompt("## system\ns\n## user\n   \n")


def test_unknown_placeholder_is_an_error_naming_file_and_placeholder(tmp_path: Path) -> None:
    _write(tmp_path, "probe/v1.md", "## system\nYou help {{company}}.\n## user\n{{text}}\n")
    with pytest.raises(PromptError) as info:
        load_prompt(tmp_path, "probe/v1.md")
    msg = str(info.value)
    assert "{{company}}" in msg
    assert str((tmp_path / "probe" / "v1.md").resolve()) in msg
    _write(tmp_path, "probe/v2.md", "## system\ns\n## user\n{{text}} {{ text | upper }}\n")
    with pytest.raises(PromptError, match=re.escape("{{ text | upper }}")):
        load_prompt(tmp_path, "probe/v2.md")
    _write(tmp_path, "probe/v3.md", "## system\ns\n## user\n{{text}} and {{document_id\n")
    with pytest.raises(PromptError, match="unclosed"):
        load_prompt(tmp_path, "probe/v3.md")
    # request building refuses the bad template too
    with pytest.raises(PromptError):
        _probe_task("probe/v1.md").request_bodies(
            units_frame([{"unit_id": "u", "text": "t"}]),
            model="m",
            endpoint=None,
            temperature=0.0,
            max_output_tokens=10,
            prompts_dir=tmp_path,
        )


def test_prompt_path_cannot_escape_the_prompts_dir(tmp_path: Path) -> None:
    _write(tmp_path, "outside.md", "## system\ns\n## user\n{{text}}\n")
    (tmp_path / "prompts").mkdir()
    with pytest.raises(PromptError, match="outside"):
        load_prompt(tmp_path / "prompts", "../outside.md")
    with pytest.raises(PromptError, match="does not exist"):
        load_prompt(tmp_path / "prompts", "nope/v1.md")


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/responses"])
def test_unit_values_are_inserted_verbatim(tmp_path: Path, endpoint: str) -> None:
    template = (
        "# probe\n## system\nSystem for {{company_id}} / {{ document_id }} {not a placeholder}\n"
        "## user\nCompany: {{company_id}}\n<doc>\n{{text}}\n</doc>\nAgain: {{text}}!\n"
    )
    _write(tmp_path, "probe/v1.md", template)
    rows = [
        {
            "unit_id": f"u{i}",
            "company_id": f"ACME {{{{text}}}} {i}",
            "document_id": "d-$1-ü",
            "text": t,
        }
        for i, t in enumerate(NASTY_TEXTS)
    ]
    bodies = _probe_task(endpoint=endpoint).request_bodies(
        units_frame(rows),
        model="gpt-4.1-mini",
        endpoint=None,
        temperature=0.0,
        max_output_tokens=50,
        prompts_dir=tmp_path,
    )
    assert bodies["unit_id"].to_list() == [r["unit_id"] for r in rows]
    for row, raw in zip(rows, bodies["body"].to_list(), strict=True):
        body = json.loads(raw)
        co, doc, text = row["company_id"], row["document_id"], row["text"]
        want_system = f"System for {co} / {doc} {{not a placeholder}}"
        want_user = f"Company: {co}\n<doc>\n{text}\n</doc>\nAgain: {text}!"
        if endpoint == "/v1/chat/completions":
            system, user = (m["content"] for m in body["messages"])
        else:
            system, user = body["instructions"], body["input"]
        assert system.encode() == want_system.encode()
        assert user.encode() == want_user.encode()


def test_real_prompts_insert_nasty_text_verbatim(prompts_dir: Path) -> None:
    rows = [
        {"unit_id": f"u{i}", "company_id": "co {{text}}", "document_id": "doc {% x %}", "text": t}
        for i, t in enumerate(NASTY_TEXTS)
    ]
    units = units_frame(rows)
    for task in list_tasks():
        source = (prompts_dir / task.prompt).read_text(encoding="utf-8")
        bodies = task.request_bodies(
            units,
            model="gpt-4.1-mini",
            endpoint=None,
            temperature=0.0,
            max_output_tokens=50,
            prompts_dir=prompts_dir,
        )
        for row, raw in zip(rows, bodies["body"].to_list(), strict=True):
            body = json.loads(raw)
            want = _independent_render(source, {k: str(v) for k, v in row.items()})
            if task.endpoint == "/v1/chat/completions":
                got = tuple(m["content"] for m in body["messages"])
            else:
                got = (body["instructions"], body["input"])
            assert got == want
            assert row["text"] in got[1]


def test_null_placeholder_values_become_empty_strings(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "probe/v1.md",
        "## system\ns\n## user\n[{{company_id}}|{{document_id}}] {{text}}\n",
    )
    units = pl.DataFrame(
        {"unit_id": ["u"], "company_id": [None], "document_id": [None], "text": ["hello"]},
        schema={
            "unit_id": pl.String,
            "company_id": pl.String,
            "document_id": pl.String,
            "text": pl.String,
        },
    )
    body = json.loads(
        _probe_task().request_bodies(
            units,
            model="m",
            endpoint=None,
            temperature=0.0,
            max_output_tokens=5,
            prompts_dir=tmp_path,
        )["body"][0]
    )
    assert body["messages"][1]["content"] == "[|] hello"


def test_resolve_prompts_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_prompts_dir(str(tmp_path / "mine")) == tmp_path / "mine"
    monkeypatch.chdir(tmp_path)
    assert resolve_prompts_dir("") == REPO_PROMPTS  # no ./prompts here: the repo's
    (tmp_path / "prompts").mkdir()
    assert resolve_prompts_dir("") == (tmp_path / "prompts").resolve()


def test_json_escaped_is_exact_for_every_character_class() -> None:
    from batchyard.tasks.prompts import json_escaped

    values = [
        "".join(chr(c) for c in range(0x00, 0x80)),  # every ASCII char, controls included
        "\u2028\u2029\u00a0\ufeff é ß 中文 😀 \U0010ffff",
        '"\\"\\\\/"',
        "",
        None,
    ]
    frame = pl.DataFrame({"v": values}, schema={"v": pl.String})
    escaped = frame.select(json_escaped(pl.col("v")))["v"].to_list()
    for value, inner in zip(values, escaped, strict=True):
        assert json.loads(f'"{inner}"') == (value or "")
        assert json.loads(f'"{inner}{inner}"') == (value or "") * 2  # escapes concatenate


def _enum_labels(schema: object) -> set[str]:
    if isinstance(schema, dict):
        found = set(schema.get("enum", []))
        for value in schema.values():
            found |= _enum_labels(value)
        return found
    if isinstance(schema, list):
        return set().union(*(_enum_labels(v) for v in schema)) if schema else set()
    return set()


def test_prompts_define_every_label_of_their_schema(prompts_dir: Path) -> None:
    for task in list_tasks():
        system, _ = task.load_prompt(prompts_dir).render({})
        labels = _enum_labels(task.json_schema())
        assert labels, task.name
        undefined = sorted(label for label in labels if label not in system)
        assert not undefined, f"{task.name}: labels not explained in the prompt: {undefined}"
