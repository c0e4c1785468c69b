"""The synchronous endpoints through the real `openai` SDK: same answers as a batch line, faults."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import numpy as np
import openai
import pytest
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, Field

from batchyard.localapi.completions import REFUSAL_TEXT
from batchyard.localapi.vectors import hash_embedding
from batchyard.tokens import count_tokens

if TYPE_CHECKING:
    from batchyard.localapi.runner import LocalServer
    from conftest import Api, MakeServer

MODEL = "text-embedding-3-small"


class Verdict(BaseModel):
    label: str = Field(min_length=2, max_length=30)
    score: float = Field(ge=0, le=1)
    tags: list[str] = Field(min_length=1, max_length=3)


SCHEMA = to_strict_json_schema(Verdict)


def sdk(server: LocalServer, key: str = "test", **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, **options)


def post(server: LocalServer, path: str, body: Any, key: str = "test") -> httpx.Response:
    """A raw POST of `body` (bytes sent as they are), for what the SDK would not send."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        server.base_url + path,
        content=content,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )


class _Line(msgspec.Struct):
    custom_id: str
    response: dict[str, msgspec.Raw]


def raw_bodies(output: bytes) -> dict[str, bytes]:
    """custom_id -> the exact bytes of `response.body` in an output file."""
    lines = msgspec.json.Decoder(_Line).decode_lines(output)
    return {ln.custom_id: bytes(ln.response["body"]) for ln in lines}


def batch_output(api: Api, lines: list[dict[str, Any]], endpoint: str) -> bytes:
    batch = api.run(lines, endpoint)
    assert batch.status == "completed" and batch.output_file_id
    return api.client.files.content(batch.output_file_id).content


def test_embeddings_answer_what_a_batch_line_gets(api: Api) -> None:
    client = sdk(api.server)
    texts = ["Revenue rose 12% to €4.2bn.", "naïve café — 東京 📈"]

    floats = client.embeddings.create(model=MODEL, input=texts, dimensions=8, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1] and floats.model == MODEL
    for text, item in zip(texts, floats.data, strict=True):
        assert np.array_equal(np.asarray(item.embedding, np.float32), hash_embedding(text, 8))
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0

    # without encoding_format the SDK asks for base64 and decodes it itself
    default = client.embeddings.create(model=MODEL, input=texts[0], dimensions=8)
    as_f32 = [np.asarray(r.data[0].embedding, np.float32) for r in (default, floats)]
    assert np.array_equal(*as_f32)  # 9 significant digits in JSON round-trip a float32
    native = client.embeddings.create(model=MODEL, input="x", encoding_format="float")
    assert len(native.data[0].embedding) == 1536

    # the very bytes a batch line with the same body gets, for float and base64
    bodies = [
        {"model": MODEL, "input": texts, "dimensions": 8, "encoding_format": fmt}
        for fmt in ("float", "base64")
    ]
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings", "body": b}
             for i, b in enumerate(bodies)]
    in_batch = raw_bodies(batch_output(api, lines, "/v1/embeddings"))
    for i, body in enumerate(bodies):
        sync = post(api.server, "/embeddings", body)
        assert sync.status_code == 200 and sync.headers["x-request-id"].startswith("req_")
        assert sync.content == in_batch[f"r{i}"]
    b64 = json.loads(in_batch["r1"])["data"][1]["embedding"]
    assert np.array_equal(np.frombuffer(base64.b64decode(b64), np.float32), hash_embedding(texts[1], 8))


def test_chat_and_responses_answer_what_a_batch_line_gets(api: Api) -> None:
    client = sdk(api.server)
    text = "The harbour bridge opened in 1932 and changed the city."
    chat = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "Extract."}, {"role": "user", "content": text}],
        response_format={"type": "json_schema", "json_schema": {"name": "Verdict", "schema": SCHEMA, "strict": True}},
    )
    content = chat.choices[0].message.content
    assert chat.object == "chat.completion" and chat.choices[0].finish_reason == "stop" and content
    verdict = Verdict.model_validate_json(content)
    assert chat.usage is not None and chat.usage.prompt_tokens > 0

    resp = client.responses.create(
        model="gpt-4o-mini",
        input=[{"role": "user", "content": text}],
        text={"format": {"type": "json_schema", "name": "Verdict", "schema": SCHEMA, "strict": True}},
    )
    assert resp.status == "completed"
    Verdict.model_validate_json(resp.output_text)

    # a batch line with the same body gets the same content (the answer depends on the body only)
    line = api.chat("c1", text, SCHEMA)
    line["body"]["messages"][0]["content"] = "Extract."
    line["body"]["response_format"]["json_schema"]["name"] = "Verdict"
    out = api.by_id(api.run([line], "/v1/chat/completions").output_file_id)
    assert out["c1"]["response"]["body"]["choices"][0]["message"]["content"] == content
    assert Verdict.model_validate_json(content) == verdict


def test_a_keyed_server_wants_the_key_on_the_sync_endpoints(make_server: MakeServer) -> None:
    key, wrong = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    server = make_server(api_keys=[key])
    for call in (
        lambda c: c.embeddings.create(model=MODEL, input="x"),
        lambda c: c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]),
        lambda c: c.responses.create(model="gpt-4o-mini", input="x"),
    ):
        with pytest.raises(openai.AuthenticationError) as ei:
            call(sdk(server, wrong))
        assert ei.value.code == "invalid_api_key" and wrong not in str(ei.value)
        call(sdk(server, key))
    # refused calls never reached the app: only the three good ones are recorded
    assert [c.status for c in server.sync_calls()] == [200, 200, 200]


def test_text_markers_apply_to_sync_calls_only_when_turned_on(api: Api, marked_api: Api) -> None:
    plain = sdk(api.server).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "please fail [[fault:error500]]"}])
    assert plain.choices[0].message.content, "markers are off by default: a normal answer"
    client = sdk(marked_api.server)

    def chat(text: str) -> Any:
        return client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": text}],
            response_format={"type": "json_schema", "json_schema": {"name": "V", "schema": SCHEMA, "strict": True}},
        )

    with pytest.raises(openai.BadRequestError) as e400:
        chat("please fail [[fault:error400]]")
    assert "[[fault:error400]]" in e400.value.message
    with pytest.raises(openai.InternalServerError) as e500:
        chat("please fail [[fault:error500]]")
    assert e500.value.status_code == 500
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="[[fault:error400]] in an embedding")
    refused = chat("no way [[fault:refusal]]").choices[0].message
    assert refused.refusal == REFUSAL_TEXT and refused.content is None
    broken = chat("say it [[fault:invalid_json]]").choices[0].message.content or ""
    with pytest.raises(ValueError):
        json.loads(broken)
    cut = chat("long story [[fault:truncated]]").choices[0]
    assert cut.finish_reason == "length"


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/embeddings", {"model": MODEL}, "input", "missing_required_parameter"),
        ("/embeddings", {"input": "x"}, "model", "missing_required_parameter"),
        ("/embeddings", {"model": MODEL, "input": []}, "input", "invalid_value"),
        ("/embeddings", {"model": MODEL, "input": ["ok", ""]}, "input", "invalid_value"),
        ("/embeddings", {"model": MODEL, "input": "x", "dimensions": 5000}, None, "invalid_request"),
        ("/embeddings", {"model": MODEL, "input": "x", "encoding_format": "hex"}, None, "invalid_request"),
        ("/embeddings", {"model": MODEL, "input": "word " * 9000}, "input", "invalid_value"),
        ("/chat/completions", {"model": "gpt-4o-mini", "messages": []}, "messages", "invalid_value"),
        ("/responses", {"model": "gpt-4o-mini"}, "input", "missing_required_parameter"),
        ("/embeddings", [1, 2], None, "invalid_value"),
        ("/embeddings", b"{not json", None, None),
    ],
    ids=["no-input", "no-model", "empty-list", "empty-string", "dimensions", "encoding",
         "too-many-tokens", "no-messages", "no-responses-input", "not-an-object", "not-json"],
)
def test_a_bad_body_is_answered_400(
    server: LocalServer, path: str, body: Any, param: str | None, code: str | None
) -> None:
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error.keys() == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert "body." not in error["message"]


def test_sdk_sees_bad_bodies_as_bad_request(server: LocalServer) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        sdk(server).embeddings.create(model=MODEL, input="x", dimensions=0)
    assert "dimensions" in ei.value.message


def test_injected_429_carries_retry_after(make_server: MakeServer) -> None:
    whole = make_server(faults={"sync_429_rate": 1.0, "sync_retry_after_s": 2})
    with pytest.raises(openai.RateLimitError) as ei:
        sdk(whole).embeddings.create(model=MODEL, input="x")
    assert ei.value.code == "rate_limit_exceeded"
    assert ei.value.response.headers["retry-after"] == "2"
    assert "retry-after-ms" not in ei.value.response.headers

    part = make_server(faults={"sync_429_rate": 1.0, "sync_retry_after_s": 0.25})
    r = post(part, "/responses", {"model": "gpt-4o-mini", "input": "x"})
    assert r.status_code == 429
    assert (r.headers["retry-after"], r.headers["retry-after-ms"]) == ("1", "250")


def test_every_nth_call_is_answered_429_whatever_its_body(make_server: MakeServer) -> None:
    server = make_server(faults={"sync_429_every": 4, "sync_retry_after_s": 0.5})
    calls = [("/embeddings", {"model": MODEL, "input": f"t{i % 3}"}) for i in range(9)]
    calls += [("/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})] * 3
    answers = [post(server, path, body) for path, body in calls]
    assert [r.status_code for r in answers] == [200, 200, 200, 429] * 3
    limited = answers[3]
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert (limited.headers["retry-after"], limited.headers["retry-after-ms"]) == ("1", "500")
    assert [c.status for c in server.sync_calls()] == [200, 200, 200, 429] * 3


def test_injected_5xx_and_slow_answers(make_server: MakeServer) -> None:
    failing = make_server(faults={"sync_5xx_rate": 1.0, "sync_5xx_statuses": [502, 503]})
    statuses = {post(failing, "/embeddings", {"model": MODEL, "input": f"t{i}"}).status_code for i in range(12)}
    assert statuses == {502, 503}
    with pytest.raises(openai.InternalServerError):
        sdk(failing).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])

    slow = make_server(faults={"sync_slow_rate": 1.0, "sync_slow_s": 0.6})
    t0 = time.monotonic()
    with pytest.raises(openai.APITimeoutError):  # the client gave up before the answer came
        sdk(slow, timeout=0.2).embeddings.create(model=MODEL, input="x")
    patient = sdk(slow, timeout=5).embeddings.create(model=MODEL, input="x", encoding_format="float")
    assert time.monotonic() - t0 >= 0.2 + 0.6 and patient.data[0].embedding
    assert [c.status for c in slow.sync_calls()] == [200, 200]  # the server did the work both times


def test_faults_are_deterministic_per_seed_and_redrawn_per_arrival(make_server: MakeServer) -> None:
    faults = {"sync_429_rate": 0.5, "sync_5xx_rate": 0.2, "seed": 7}
    bodies = [{"model": MODEL, "input": f"text {i}"} for i in range(10)]

    def statuses(server: LocalServer) -> list[int]:
        with httpx.Client(base_url=server.base_url, headers={"Authorization": "Bearer t"}) as http:
            return [http.post("/embeddings", json=b).status_code for _ in range(4) for b in bodies]

    first, second = statuses(make_server(faults=faults)), statuses(make_server(faults=faults))
    assert first == second
    assert {429, 200} <= set(first) and any(s >= 500 for s in first)
    # the same body is drawn afresh on each arrival, so a retried request can get through
    per_body = [[first[r * 10 + i] for r in range(4)] for i in range(10)]
    assert any(len(set(seq)) > 1 for seq in per_body)
    other = statuses(make_server(faults={**faults, "seed": 8}))
    assert other != first


def test_every_sync_call_is_recorded(make_server: MakeServer) -> None:
    server = make_server(faults={"transient_error_rate": 0.5, "seed": 3})
    bodies = [{"model": MODEL, "input": ["alpha beta", f"gamma {i}"]} for i in range(10)]
    bodies += bodies[:3]  # three bodies arrive twice
    for body in bodies:
        post(server, "/embeddings", body)
    calls = server.sync_calls()
    assert len(calls) == 13 and [c.at for c in calls] == sorted(c.at for c in calls)
    answered = [c for c in calls if c.digest]
    transient = [c for c in calls if not c.digest]
    assert answered and transient  # the transient faults' answers are recorded too
    assert all(c.status in (429, 500, 503) and c.tokens == 0 for c in transient)
    expected = {
        hashlib.sha256(json.dumps(b).encode()).hexdigest()[:24]: sum(count_tokens(b["input"]))
        for b in bodies
    }
    assert all(c.status == 200 and c.tokens == expected[c.digest] for c in answered)
    arrivals: dict[str, list[int]] = {}
    for c in answered:
        arrivals.setdefault(c.digest, []).append(c.arrival)
    assert all(seen == list(range(1, len(seen) + 1)) for seen in arrivals.values())
