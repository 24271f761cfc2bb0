"""A scripted OpenAI-compatible chat server on loopback, for tests of the LLM paths.

It speaks the real wire format of POST /v1/chat/completions (messages in; a choice with
content or tool_calls out; usage), so the real langchain-openai client is exercised. Each
request pops the next scripted answer; a callable answer can inspect the request (e.g. obey an
injection it finds, to prove that validation in code catches it). Every request is recorded.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .serving import serving


def tool_call(name: str, arguments: dict | str) -> dict:
    """A scripted answer that calls one tool (arguments may be a deliberately broken string)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"tool_calls": [{"id": f"call_{uuid.uuid4().hex[:8]}", "type": "function",
                            "function": {"name": name, "arguments": args}}]}


def text(content: str) -> dict:
    return {"content": content}


class ScriptedOpenAI:
    def __init__(self, script: list[dict | Callable[[dict], dict]] | None = None, default: dict | None = None):
        self.script = list(script or [])
        self.default = default
        self.requests: list[dict] = []
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self._chat)
        self.app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    async def _chat(self, request: Request):
        body = await request.json()
        self.requests.append(body)
        if not self.script and self.default is None:
            return JSONResponse({"error": {"message": "script exhausted", "type": "server_error"}}, status_code=500)
        answer = self.script.pop(0) if self.script else self.default
        if callable(answer):
            answer = answer(body)
        if "raw" in answer:  # not JSON at all, to test clients against garbage
            return PlainTextResponse(answer["raw"], status_code=answer.get("status", 200))
        message = {"role": "assistant", "content": answer.get("content")}
        if answer.get("tool_calls"):
            message["tool_calls"] = answer["tool_calls"]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "scripted"),
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if answer.get("tool_calls") else "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }


@contextmanager
def running(server: ScriptedOpenAI):
    """Serve on a free loopback port; yields the base URL to use as DIFFGRAPH_LLM_BASE_URL."""
    with serving(server.app) as url:
        yield f"{url}/v1"
