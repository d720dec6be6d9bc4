"""POST /v1/chat/completions in OpenAI's wire shapes: one image per request (more is a 400 that says so),
a chat with no image is a text-only query, and OpenAI parameters the server does not honour are refused
by name instead of being ignored."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from moonbase.api import VL
from moonbase.server.app import create_app
from moonbase.server.models import ServedModels

GREEDY = {"temperature": 0, "max_tokens": 4}


@pytest.fixture(scope="module")
def vl(tiny):
    return VL(tiny)


@pytest.fixture(scope="module")
def client(vl):
    return TestClient(create_app(ServedModels({"tiny": vl}, "tiny")))


def _png(color: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


RED, BLUE = _png((220, 30, 30)), _png((30, 30, 220))


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def _chat(client: TestClient, messages: list[dict], **params):
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, **GREEDY, **params})


def _error(r) -> str:
    assert r.status_code == 400, r.text
    body = r.json()["error"]
    assert body["type"] == "invalid_request_error" and body["code"] == 400
    return body["message"]


def test_two_images_in_one_message_are_refused_with_the_count(client):
    message = _error(_chat(client, [_user(_image(RED), _image(BLUE), _text("Which is red?"))]))
    assert "one image per request" in message and "2 images" in message


def test_images_across_messages_are_refused(client):
    messages = [
        _user(_image(RED), _text("What color?")),
        {"role": "assistant", "content": "Red."},
        _user(_image(BLUE), _image(RED), _text("And these?")),
    ]
    message = _error(_chat(client, messages))
    assert "one image per request" in message and "3 images" in message


def test_one_image_is_the_image_the_answer_is_about(client, vl):
    messages = [
        {"role": "system", "content": "Be brief."},
        _user(_text("First question")),
        {"role": "assistant", "content": [_text("An answer.")]},
        _user(_image(BLUE), _text("What color is it?")),
    ]
    r = _chat(client, messages)
    assert r.status_code == 200, r.text
    blue = np.asarray(Image.open(io.BytesIO(base64.b64decode(BLUE.split(",")[1]))).convert("RGB"))
    want = vl.query(blue, "What color is it?", settings=GREEDY)["answer"]
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": want}


def test_a_chat_with_no_image_is_a_text_only_query(client, vl):
    for content in ("Say hello.", [_text("Say"), _text("hello.")]):
        r = _chat(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}])
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["message"]["content"]
        assert isinstance(answer, str) and answer == vl.query(None, "Say hello.", settings=GREEDY)["answer"]
        assert r.json()["usage"]["prompt_tokens"] > 0


def test_response_format_json_object_is_refused_by_name(client):
    message = _error(_chat(client, [_user(_text("hi"))], response_format={"type": "json_object"}))
    assert "response_format" in message


def test_every_unhonoured_parameter_is_named_in_one_error(client):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather at a place",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    message = _error(_chat(client, [_user(_text("hi"))], n=2, tools=tools))
    assert "`n`" in message and "`tools`" in message
    others = {"logprobs": True, "stop": ["\n"], "presence_penalty": 0.5, "tool_choice": "required", "seed": 3}
    message = _error(_chat(client, [_user(_text("hi"))], **others))
    for name in ("logprobs", "stop", "presence_penalty", "tool_choice"):
        assert f"`{name}`" in message
    assert "`seed`" not in message  # honoured


@pytest.mark.parametrize(
    "params",
    [
        {"n": 1, "response_format": {"type": "text"}},
        {"n": None, "response_format": None, "tools": [], "tool_choice": "none", "logprobs": False, "stop": None},
        {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "modalities": ["text"], "top_logprobs": None},
        {"user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "seed": 1, "top_p": 0.9},
        {"x_client_extension": {"anything": 1}},  # non-OpenAI keys are ignored, as on every route
    ],
)
def test_harmless_values_of_unhonoured_parameters_are_accepted(client, params):
    r = _chat(client, [_user(_image(RED), _text("What color?"))], **params)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["choices"][0]["message"]["content"], str)


def test_bools_are_not_taken_for_harmless_numbers(client):
    message = _error(_chat(client, [_user(_text("hi"))], n=True, presence_penalty=False))
    assert "`n`" in message and "`presence_penalty`" in message


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, _text("hi")], "input_audio"),
        ([{"type": "file", "file": {"file_id": "file-1"}}], "file"),
        ([{"text": "no type"}], "type"),
        ([{"type": "text", "text": 5}], "text"),
        ([{"type": "text"}], "text"),
        ([{"type": "image_url", "image_url": RED}, _text("hi")], "image_url"),  # not the OpenAI shape
        ([{"type": "image_url", "image_url": {"url": 5}}, _text("hi")], "url"),
        ([{"type": "image_url", "image_url": {}}, _text("hi")], "url"),
        ([{"type": "image_url", "image_url": {"url": RED, "detail": "ultra"}}, _text("hi")], "detail"),
        ([{"type": "image_url"}, _text("hi")], "image_url"),
    ],
)
def test_malformed_or_unknown_content_parts_are_refused(client, content, named):
    assert named in _error(_chat(client, [{"role": "user", "content": content}]))


def test_messages_need_a_user_message(client):
    assert "user message" in _error(_chat(client, [{"role": "system", "content": "Be brief."}]))


def _events(client: TestClient, body: dict) -> list:
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_stream_options_include_usage_adds_a_final_usage_chunk(client, vl):
    body = {"messages": [_user(_image(RED), _text("What color?"))], "stream": True, **GREEDY}
    plain = _events(client, body)
    assert all("usage" not in e for e in plain)
    events = _events(client, body | {"stream_options": {"include_usage": True}})
    *chunks, last = events
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk"
    usage = last["usage"]
    assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert all(e["usage"] is None for e in chunks)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in chunks)
    assert text == "".join(e["choices"][0]["delta"].get("content", "") for e in plain)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    r = _chat(client, [_user(_text("hi"))], stream=True, stream_options={"include_usage": "yes"})
    assert "include_usage" in _error(r)
