"""POST /v1/chat/completions, OpenAI-compatible. Moondream 2 has no chat template: the answer is the
model's answer to the last user message's text, about the most recent image in the conversation (an
`image_url` part with a data URL); earlier turns are not fed to the model."""

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
from .cancel import cancellable
from .registry import ModelRegistry


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool = False
    reasoning: StrictBool | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    seed: int | None = None


def _parts(message: ChatMessage) -> tuple[str, str | None]:
    if isinstance(message.content, str) or message.content is None:
        return message.content or "", None
    text, image = [], None
    for part in message.content:
        if part.get("type") == "text":
            text.append(str(part.get("text", "")))
        elif part.get("type") == "image_url":
            url = part.get("image_url")
            image = url.get("url") if isinstance(url, dict) else url
            if not isinstance(image, str):
                raise SettingsError("image_url parts need a data URL string")
    return " ".join(t for t in text if t), image


def add_chat_route(app: FastAPI, registry: ModelRegistry, image_of: Callable[[str | None], Any]) -> None:
    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest):
        sel = registry.select(body.model)
        users = [m for m in body.messages if m.role == "user"]
        if not users:
            raise SettingsError("messages need at least one user message")
        question, _ = _parts(users[-1])
        image = next((img for m in reversed(body.messages) if (img := _parts(m)[1]) is not None), None)
        settings = {"temperature": body.temperature, "top_p": body.top_p, "seed": body.seed}
        settings["max_tokens"] = body.max_completion_tokens or body.max_tokens
        settings = {k: v for k, v in settings.items() if v is not None} | ({"variant": sel.adapter} if sel.adapter else {})
        stats: dict[str, Any] = {}

        def run():
            return sel.vl.query(image_of(image), question, body.stream, settings, bool(body.reasoning), stats=stats)

        out = await cancellable(request, sel.vl, run)
        rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        if body.stream:
            return StreamingResponse(_chunks(out["answer"], rid, created, sel.name, stats), media_type="text/event-stream")
        message: dict[str, Any] = {"role": "assistant", "content": out["answer"]}
        if "reasoning" in out:
            message["reasoning"] = out["reasoning"]["text"]
            message["reasoning_details"] = {"grounding": out["reasoning"]["grounding"]}
        prompt_tokens = stats["input_tokens"] + stats["image_tokens"]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": sel.name,
            "choices": [{"index": 0, "message": message, "finish_reason": _finish(stats)}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": stats["output_tokens"],
                "total_tokens": prompt_tokens + stats["output_tokens"],
            },
        }


def _finish(stats: dict[str, Any]) -> str:
    return "length" if stats.get("stop_reason") in ("max_tokens", "context") else "stop"


def _chunks(pieces: Iterator[str], rid: str, created: int, model: str, stats: dict[str, Any]) -> Iterator[str]:
    def event(delta: dict[str, Any], finish: str | None = None) -> str:
        chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
        return "data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n"

    yield event({"role": "assistant", "content": ""})
    try:
        for piece in pieces:
            yield event({"content": piece})
    except Exception as e:  # after the 200 header: report in-band, then end the stream
        yield "data: " + json.dumps({"error": {"message": str(e), "type": type(e).__name__}}) + "\n\n"
    else:
        yield event({}, _finish(stats))
    yield "data: [DONE]\n\n"
