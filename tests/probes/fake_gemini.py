"""A local stand-in for the Gemini `generateContent` endpoint, for tests of the real google-genai client.

The server binds 127.0.0.1 on a free port; point the client at it with
`types.HttpOptions(base_url=server.base_url)`. It records every request (path, prompt text,
generation config, the API key header, arrival time, body size) and answers with a fresh valid sentence unless
a script says otherwise: `server.script("some prompt text", Status(429, retry_after="1"), Refusal())`
makes the next two requests whose prompt contains "some prompt text" get those answers, in order.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


# ---- scripted answers ------------------------------------------------------------------------
@dataclass(frozen=True)
class Text:
    """A normal reply with this text (finishReason STOP unless given)."""
    text: str
    finish_reason: str = "STOP"


@dataclass(frozen=True)
class Status:
    """An HTTP error status with a Google-style error body (plus Retry-After when given)."""
    code: int
    retry_after: str | None = None
    message: str = "scripted error"


@dataclass(frozen=True)
class Sleep:
    """Answer normally, but only after this many seconds (longer than the client timeout: a timeout)."""
    seconds: float


@dataclass(frozen=True)
class Malformed:
    """200 with a body that is not JSON."""


@dataclass(frozen=True)
class NoCandidates:
    """200 with an empty candidate list."""


@dataclass(frozen=True)
class SafetyBlocked:
    """A candidate stopped for safety: finishReason SAFETY and no text."""


@dataclass(frozen=True)
class PromptBlocked:
    """The prompt itself blocked: promptFeedback.blockReason SAFETY and no candidates."""


def Refusal() -> Text:
    return Text("I'm sorry, but I can't help with rewriting that.")


@dataclass
class Seen:
    path: str
    contents: str
    generation_config: dict
    api_key: str | None
    at: float
    body_bytes: int = 0   # the request body as it arrived (Content-Length)


def default_reply(contents: str, generation_config: dict, number: int) -> str:
    """A short valid reply, different for each prompt, seed and request number."""
    tag = hashlib.sha256(f"{contents}|{generation_config.get('seed')}|{number}".encode()).hexdigest()[:10]
    return f"A freshly written sentence with tag {tag} and nothing else."


class FakeGemini:
    def __init__(self):
        self._lock = threading.Lock()
        self._rules: list[tuple[str, deque]] = []
        self._closing = threading.Event()
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="fake-gemini", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeGemini":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def script(self, match: str, *answers) -> None:
        """The next len(answers) requests whose prompt contains `match` get these answers, in order."""
        with self._lock:
            self._rules.append((match, deque(answers)))

    def count(self, match: str | None = None) -> int:
        with self._lock:
            return sum(1 for s in self.seen if match is None or match in s.contents)

    def counts(self) -> Counter:
        with self._lock:
            return Counter(s.contents for s in self.seen)

    def requests_for(self, match: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if match in s.contents]

    # ---- called by the handler ----
    def _next_answer(self, contents: str):
        with self._lock:
            for match, answers in self._rules:
                if match in contents and answers:
                    return answers.popleft()
        return None

    def _record(self, seen: Seen) -> int:
        with self._lock:
            self.seen.append(seen)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return len(self.seen)

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1


def _usage(contents: str, text: str) -> dict:
    prompt_tokens, reply_tokens = len(contents.split()), len(text.split())
    return {"promptTokenCount": prompt_tokens, "candidatesTokenCount": reply_tokens,
            "totalTokenCount": prompt_tokens + reply_tokens}


def _candidate_body(text: str, finish_reason: str, contents: str) -> dict:
    return {"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": finish_reason,
                            "index": 0}],
            "usageMetadata": _usage(contents, text), "modelVersion": "fake"}


def _handler_for(fake: FakeGemini):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # keep test output clean
            pass

        def _send(self, code: int, body: bytes, headers: dict | None = None) -> None:
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            try:
                request = json.loads(self.rfile.read(length))
                contents = request["contents"][0]["parts"][0]["text"]
                config = request.get("generationConfig", {})
            except (ValueError, KeyError, IndexError, TypeError):
                self._send(400, b'{"error": {"code": 400, "message": "bad request", "status": "INVALID_ARGUMENT"}}')
                return
            number = fake._record(Seen(self.path, contents, config, self.headers.get("x-goog-api-key"),
                                       time.monotonic(), length))
            try:
                self._answer(fake._next_answer(contents), contents, config, number)
            finally:
                fake._done()

        def _answer(self, answer, contents: str, config: dict, number: int) -> None:
            if isinstance(answer, Sleep):
                fake._closing.wait(answer.seconds)
                answer = None
            if answer is None:
                answer = Text(default_reply(contents, config, number))
            if isinstance(answer, Text):
                body = _candidate_body(answer.text, answer.finish_reason, contents)
            elif isinstance(answer, Status):
                error = {"error": {"code": answer.code, "message": answer.message,
                                   "status": {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
                                              403: "PERMISSION_DENIED"}.get(answer.code, "UNKNOWN")}}
                headers = {"Retry-After": answer.retry_after} if answer.retry_after else None
                self._send(answer.code, json.dumps(error).encode(), headers)
                return
            elif isinstance(answer, Malformed):
                self._send(200, b'{"candidates": [{"content": {"parts": [{"text": "cut of')
                return
            elif isinstance(answer, NoCandidates):
                body = {"candidates": [], "usageMetadata": _usage(contents, "")}
            elif isinstance(answer, SafetyBlocked):
                body = {"candidates": [{"finishReason": "SAFETY", "index": 0,
                                        "safetyRatings": [{"category": "HARM_CATEGORY_HARASSMENT",
                                                           "probability": "HIGH", "blocked": True}]}],
                        "usageMetadata": _usage(contents, "")}
            elif isinstance(answer, PromptBlocked):
                body = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": _usage(contents, "")}
            else:
                raise TypeError(f"unknown scripted answer {answer!r}")
            self._send(200, json.dumps(body).encode())

    return Handler
