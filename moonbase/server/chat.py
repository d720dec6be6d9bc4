"""POST /v1/chat/completions, OpenAI-compatible within what Moondream does: the answer is a query about the
last user message's text parts (joined with spaces; earlier turns are not fed, Moondream 2 has no chat
template) and about the one `image_url` part of the request, if any. More than one image is a 400 that
says how many were sent; a part of another type, or without its string, is a 400 naming it.

Honoured: `model`, `messages`, `stream`, `stream_options.include_usage`, `temperature`, `top_p`,
`max_completion_tokens` / `max_tokens`, `seed`, and Moondream's `reasoning`. The parameters in `UNHONOURED`
get a 400 naming them unless set to a value that changes nothing (`n: 1`, ...). Metadata that does not
change the answer (`user`, `metadata`, `store`, `service_tier`, ...) and keys OpenAI does not define are
ignored, as on every route (clients add their own); nothing is stored."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from ..errors import SettingsError
from ..skills import SkillRequest
from ..skills.program import StopReason
from .cancel import cancellable
from .errors import error_body
from .models import Selection

# OpenAI chat-completions parameters this server does not honour -> the values that change nothing.
UNHONOURED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),  # with no tools, "auto" answers in text, as here
    "parallel_tool_calls": (None, True, False),  # nothing to act on without tools
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "stop": (None, []),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),  # Moondream's own switch is `reasoning: true`
    "verbosity": (None,),
    "web_search_options": (None,),
}
IMAGE_DETAIL = ("auto", "low", "high")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None  # accepted, ignored: no obfuscation padding is added


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    reasoning: StrictBool | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    seed: int | None = None


def _harmless(value: Any, allowed: tuple[Any, ...]) -> bool:
    """`value` equals one of `allowed`, a bool matching only a bool (JSON `true` is not `1`)."""
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


def _refuse_unhonoured(extra: dict[str, Any]) -> None:
    bad = [k for k, allowed in UNHONOURED.items() if k in extra and not _harmless(extra[k], allowed)]
    if bad:
        named = "; ".join(f"`{k}` (only " + " or ".join(json.dumps(a) for a in UNHONOURED[k]) + ")" for k in bad)
        raise SettingsError(
            f"this server does not honour the OpenAI parameter{'s' if len(bad) > 1 else ''} {named}: "
            f"Moondream answers with one plain-text completion; leave {'them' if len(bad) > 1 else 'it'} out"
        )


def _part(where: str, role: str, part: dict[str, Any]) -> tuple[str | None, str | None]:
    """A content part's (text, image url); a malformed part or one of a type not taken is a 400."""
    kind = part.get("type")
    if kind == "text" or (kind == "refusal" and role == "assistant"):
        if not isinstance(part.get(kind), str):
            raise SettingsError(f"{where}: a {kind} part needs a string `{kind}`")
        return part[kind], None
    if kind == "image_url":
        image = part.get("image_url")
        if not isinstance(image, dict) or not isinstance(image.get("url"), str):
            raise SettingsError(f'{where}: an image_url part needs `"image_url": {{"url": "<data URL>"}}`')
        if image.get("detail") is not None and image["detail"] not in IMAGE_DETAIL:
            raise SettingsError(f"{where}: image_url `detail` must be one of {', '.join(IMAGE_DETAIL)}")
        return None, image["url"]
    if not isinstance(kind, str):
        raise SettingsError(f"{where}: a content part needs a string `type`")
    raise SettingsError(f"{where}: content part type {kind!r} is not supported (only 'text' and 'image_url')")


def _conversation(messages: list[ChatMessage]) -> tuple[str, str | None]:
    """The question (the last user message's text) and the one image of the request, if any."""
    question, images = None, []
    for i, message in enumerate(messages):
        content = message.content
        if content is None or isinstance(content, str):
            parts = [(content or "", None)]
        else:
            parts = [_part(f"messages[{i}].content[{j}]", message.role, p) for j, p in enumerate(content)]
        images += [(i, url) for _, url in parts if url is not None]
        if message.role == "user":
            question = " ".join(text for text, _ in parts if text)
    if question is None:
        raise SettingsError("messages need at least one user message")
    if len(images) > 1:
        where = ", ".join(f"messages[{i}]" for i, _ in images)
        raise SettingsError(
            f"Moondream answers about one image per request, and this request has {len(images)} images "
            f"(in {where}); send one image_url part per request"
        )
    return question, images[0][1] if images else None


def add_chat_route(app: FastAPI, select: Callable[..., Selection], image_of: Callable[[str], Any], timeout: float | None) -> None:
    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest):
        sel = select(body.model)
        _refuse_unhonoured(body.model_extra or {})
        question, image = _conversation(body.messages)
        settings = {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed}
        settings["max_tokens"] = body.max_completion_tokens or body.max_tokens
        settings = {k: v for k, v in settings.items() if v is not None} | ({"variant": sel.adapter} if sel.adapter else {})
        stats: dict[str, Any] = {}

        def run():
            decoded = None if image is None else image_of(image)
            req = SkillRequest("query", decoded, question, reasoning=body.reasoning, settings=settings)
            return sel.vl.run(req, body.stream, stats, timeout)

        out = await cancellable(request, sel.vl, run)
        rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chunks(out["answer"], rid, created, sel.name, stats, usage), media_type="text/event-stream")
        message: dict[str, Any] = {"role": "assistant", "content": out["answer"]}
        if "reasoning" in out:
            message["reasoning"] = out["reasoning"]["text"]
            message["reasoning_details"] = {"grounding": out["reasoning"]["grounding"]}
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": sel.name,
            "choices": [{"index": 0, "message": message, "finish_reason": _finish(stats)}],
            "usage": _usage(stats),
        }


def _finish(stats: dict[str, Any]) -> str:
    return StopReason(stats["stop_reason"]).finish_reason


def _usage(stats: dict[str, Any]) -> dict[str, int]:
    prompt, completion = stats["input_tokens"] + stats["image_tokens"], stats["output_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chunks(pieces: Iterator[str], rid: str, created: int, model: str, stats: dict[str, Any], usage: bool) -> Iterator[str]:
    """OpenAI's chunks; with `usage` (stream_options.include_usage) every chunk carries `"usage": null` and
    a last chunk with no choices carries the counts."""

    def event(choices: list[dict[str, Any]], counts: dict[str, int] | None = None) -> str:
        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if usage:
            chunk["usage"] = counts
        return "data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n"

    def delta(d: dict[str, Any], finish: str | None = None) -> str:
        return event([{"index": 0, "delta": d, "finish_reason": finish}])

    yield delta({"role": "assistant", "content": ""})
    try:
        for piece in pieces:
            yield delta({"content": piece})
    except Exception as e:  # after the 200 header: report in-band (the body a non-streaming error has), then end
        yield "data: " + json.dumps({"error": error_body(e)}) + "\n\n"
    else:
        yield delta({}, _finish(stats))
        if usage:
            yield event([], _usage(stats))
    yield "data: [DONE]\n\n"
