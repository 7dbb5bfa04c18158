"""Probes written by Gemini through the `google-genai` client, with a reply cache, retries and a budget.

* Requests run on a bounded thread pool (`concurrency`). Each one is looked up in the ReplyCache
  first; a reply is stored the moment it arrives, so an interrupted build loses nothing and a rerun
  sends no request twice.
* 429 (honouring Retry-After, or the RetryInfo delay in the error body), 408, 5xx, timeouts (the
  client's per-request timeout), dropped connections and malformed bodies are retried with
  exponential backoff and jitter; other HTTP errors (a refused key, an unknown model) stop the build.
* `max_requests` caps the requests sent (retries included). When it is used up the build stops with
  BudgetExhausted; what was answered stays in the cache.
* Every conversation and response put into a request is cut to `max_input_chars` characters (a
  characters budget: Gemini's tokenizer is not available locally, and counting tokens is a request
  of its own), so one long data row cannot make a request, and its cost, unbounded. A cut is marked
  in the text the model reads; a conversation keeps its end (the last turns are what a variant
  answers), a response its start.
* The API key only ever goes to the client. Every message this module raises passes through
  `redact`, and nothing it stores (cache, manifest) contains the key.
"""
from __future__ import annotations

import email.utils
import hashlib
import os
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from typing import Sequence
from urllib.parse import urlsplit

from probes.reply_cache import ReplyCache, request_key
from probes.templates import ProbeRequest, PromptTemplates
from probes.validation import BLOCKED, UNAVAILABLE
from probes.writing import BuildProgress, OnReply, Reply

KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
CUT_MARKER = " [... {} characters left out to fit the length limit ...] "
MIN_INPUT_CHARS = 100   # room for the marker and some text
TRUNCATED = "truncated"
RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_BLOCK_FINISH = frozenset({"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "RECITATION", "IMAGE_SAFETY"})


class GeminiError(RuntimeError):
    """The build cannot go on with Gemini (a refused key, an unknown model, an unreachable service)."""


class GeminiUnreachable(GeminiError):
    """No response at all arrived from the service (connection refused, no network)."""


class BudgetExhausted(GeminiError):
    """`max_requests` were sent; the replies so far are in the cache."""


def api_key_from_env(environ=None) -> tuple[str | None, str | None]:
    """(key, name of the variable it came from), or (None, None): GEMINI_API_KEY, then GOOGLE_API_KEY."""
    environ = os.environ if environ is None else environ
    for name in KEY_VARIABLES:
        value = (environ.get(name) or "").strip()
        if value:
            return value, name
    return None, None


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def safe_url(url: str | None) -> str:
    """scheme://host:port of a base URL: never credentials, paths or queries (they may hold a key)."""
    if not url:
        return "the default Gemini endpoint"
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


@dataclass(frozen=True)
class GeminiOptions:
    model: str = "gemini-2.5-flash"
    base_url: str | None = None           # a proxy or a test server; None: the client's default
    timeout_s: float = 60.0               # per request, passed to the client (http_options.timeout)
    concurrency: int = 4
    max_requests: int | None = None       # total requests this build may send, retries included
    max_retries: int = 6                  # per reply, on 429 / 5xx / timeouts / malformed replies
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_cap_s: float = 300.0      # a longer Retry-After is waited for this long
    temperature: float = 0.9              # first attempt; each retry after a rejected reply adds 0.3
    max_output_tokens: int = 512
    thinking_budget: int | None = 0       # 0: no thinking tokens (2.5 Flash); None: the model's default
    max_input_chars: int = 4000           # longest conversation or response put into a request (~1,000 tokens)
    price_input_per_m: float = 0.30       # USD per 1M input tokens (estimate; check current pricing)
    price_output_per_m: float = 2.50      # USD per 1M output tokens, thinking included

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.max_requests is not None and self.max_requests < 0:
            raise ValueError(f"max_requests must be >= 0, got {self.max_requests}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.max_input_chars < MIN_INPUT_CHARS:
            raise ValueError(f"max_input_chars must be at least {MIN_INPUT_CHARS}, got {self.max_input_chars}")


def clip(text: str, budget: int, keep_end: bool = False) -> str:
    """`text` in at most `budget` characters: its start (or its end) and a marker saying how much was left out."""
    if len(text) <= budget:
        return text
    kept = max(0, budget - len(CUT_MARKER.format(len(text))))  # the longest the count in the marker can be
    marker = CUT_MARKER.format(len(text) - kept)
    return marker + text[len(text) - kept:] if keep_end else text[:kept] + marker


def clipped_request(request: ProbeRequest, budget: int) -> ProbeRequest:
    """The request as sent: its conversation keeps its end, its response text its start (see the module docstring)."""
    return replace(request, source=clip(request.source.strip(), budget), prompt=clip(request.prompt.strip(), budget, keep_end=True))


def sampling_seed(seed: int, attempt: int, request: ProbeRequest) -> int:
    """The request's seed: changes with the attempt, and per slot for non-responses (one prompt each)."""
    slot = request.index if request.kind == "nonresponse" else -1
    digest = hashlib.sha256(f"{seed}:{attempt}:{request.kind}:{slot}".encode()).hexdigest()
    return int(digest[:8], 16) % 2**31


def attempt_temperature(base: float, attempt: int) -> float:
    return round(min(base + 0.3 * attempt, 2.0), 3)


def _enum_name(value) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


def reply_from_response(response) -> dict:
    """The cacheable part of a GenerateContentResponse: text, finish/block reasons and token counts."""
    feedback = getattr(response, "prompt_feedback", None)
    block_reason = _enum_name(getattr(feedback, "block_reason", None)) if feedback else None
    candidates = getattr(response, "candidates", None) or []
    text, finish_reason = "", None
    if candidates:
        candidate = candidates[0]
        finish_reason = _enum_name(candidate.finish_reason)
        parts = (candidate.content.parts if candidate.content and candidate.content.parts else [])
        text = "".join(part.text for part in parts if part.text and not getattr(part, "thought", False))
    usage = getattr(response, "usage_metadata", None)
    counts = {name: int(getattr(usage, field, None) or 0) for name, field in
              (("input", "prompt_token_count"), ("output", "candidates_token_count"),
               ("thoughts", "thoughts_token_count"))} if usage else {}
    return {"text": text, "finish_reason": finish_reason, "block_reason": block_reason, "usage": counts}


def reply_problem(reply: dict) -> str | None:
    """Why a stored reply has no usable text (blocked, cut off), beyond what validation checks."""
    if reply.get("block_reason") or reply.get("finish_reason") in _BLOCK_FINISH:
        return BLOCKED
    if reply.get("finish_reason") == "MAX_TOKENS":
        return TRUNCATED
    return None


def _retry_after_seconds(error) -> float | None:
    """Retry-After (seconds or an HTTP date), else a RetryInfo `retryDelay` in the error body."""
    headers = getattr(getattr(error, "response", None), "headers", None)
    value = headers.get("retry-after") if headers is not None else None
    if value:
        value = value.strip()
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    details = getattr(error, "details", None)
    body = details.get("error", details) if isinstance(details, dict) else {}
    for item in (body.get("details") or []) if isinstance(body, dict) else []:
        delay = item.get("retryDelay") if isinstance(item, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(0.0, float(delay[:-1]))
            except ValueError:
                pass
    return None


def _classify_exception(error: BaseException) -> str | None:
    """'timeout', 'connection' or 'malformed' for transient failures below HTTP status level; None otherwise."""
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"TimeoutException", "TimeoutError", "ReadTimeout", "ConnectTimeout"}:
        return "timeout"
    if names & {"ConnectError", "NetworkError", "TransportError", "RemoteProtocolError", "ConnectionError"}:
        return "connection"
    if names & {"JSONDecodeError", "UnknownApiResponseError", "ValidationError"}:
        return "malformed"
    return None


class GeminiReplies:
    """A ReplyWriter backed by the Gemini API (see the module docstring)."""

    def __init__(self, api_key: str, options: GeminiOptions, templates: PromptTemplates, cache: ReplyCache,
                 seed: int = 0, lead: str = " "):
        from google import genai
        from google.genai import types

        if not api_key:
            raise GeminiError("no API key: set GEMINI_API_KEY (or GOOGLE_API_KEY)")
        self.options, self.templates, self.cache, self.seed, self.lead = options, templates, cache, seed, lead
        self.name = f"gemini:{options.model}"
        self._key = api_key
        self._types = types
        self._client = genai.Client(
            api_key=api_key, vertexai=False,
            http_options=types.HttpOptions(base_url=options.base_url, timeout=max(1, int(options.timeout_s * 1000))))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.requests_sent = 0
        self.responses_received = 0     # any HTTP response, error statuses included
        self.replies_stored = 0

    def describe(self) -> dict:
        o = self.options
        return {"model": o.model, "temperature": o.temperature, "temperature_step_per_attempt": 0.3,
                "max_output_tokens": o.max_output_tokens, "thinking_budget": o.thinking_budget,
                "max_input_chars": o.max_input_chars}

    # ---- requests and the cache ------------------------------------------------------------
    def cache_request(self, request: ProbeRequest, attempt: int) -> dict:
        """Everything that shapes the reply; its hash is the cache key. Holds no credential."""
        sent = clipped_request(request, self.options.max_input_chars)
        entry = {"model": self.options.model, "kind": request.kind, "contents": self.templates.render(sent),
                 "temperature": attempt_temperature(self.options.temperature, attempt),
                 "seed": sampling_seed(self.seed, attempt, request),
                 "max_output_tokens": self.options.max_output_tokens}
        if self.options.thinking_budget is not None:
            entry["thinking_budget"] = self.options.thinking_budget
        if request.kind == "nonresponse":
            entry["slot"] = request.index
        return entry

    def write(self, requests: Sequence[ProbeRequest], attempt: int, progress: BuildProgress, on_reply: OnReply) -> None:
        entries = [self.cache_request(r, attempt) for r in requests]
        positions: dict[str, list[int]] = {}
        for position, entry in enumerate(entries):
            positions.setdefault(request_key(entry), []).append(position)   # identical requests are sent once
        missing = {}
        for key, group in positions.items():
            if key in self.cache:
                progress.served_from_cache(len(group))
                self._deliver(key, group, on_reply)
            else:
                missing[key] = entries[group[0]]
        self._fetch_all(missing, positions, progress, on_reply)

    def _deliver(self, key: str, group: list[int], on_reply: OnReply) -> None:
        stored = self.cache.get(key)
        text = stored["text"].strip()
        reply = Reply(self.lead + text if text else "", reply_problem(stored))
        for position in group:
            on_reply(position, reply)

    def _fetch_all(self, missing: dict[str, dict], positions: dict[str, list[int]], progress: BuildProgress,
                   on_reply: OnReply) -> None:
        """Send every missing request on the pool, delivering each reply as it is stored."""
        if not missing:
            return
        if self._stop.is_set():
            raise GeminiError("this writer was stopped earlier in the build")
        pool = ThreadPoolExecutor(max_workers=self.options.concurrency, thread_name_prefix="gemini")
        futures = [pool.submit(self._fetch_one, key, entry, positions[key], progress, on_reply)
                   for key, entry in missing.items()]
        first_error: BaseException | None = None
        try:
            pending = set(futures)
            while pending:   # short waits, so Ctrl-C reaches this thread promptly
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                for future in done:
                    error = future.exception()
                    if error is not None and first_error is None:
                        first_error = error
                        self._stop.set()
        except BaseException:   # KeyboardInterrupt: let the requests in flight finish and be stored
            self._stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if first_error is not None:
            if isinstance(first_error, BudgetExhausted):
                raise BudgetExhausted(
                    f"request budget used up: {self.options.max_requests} requests sent "
                    f"({self.replies_stored} replies stored this run, {len(self.cache)} in the cache "
                    f"{self.cache.path.name}); run again with a larger --max-requests to continue, "
                    "replies already stored are not asked for again") from None
            raise first_error

    def _take_request(self) -> None:
        with self._lock:
            if self._stop.is_set():
                raise _Stopped()
            if self.options.max_requests is not None and self.requests_sent >= self.options.max_requests:
                self._stop.set()
                raise BudgetExhausted("request budget used up")
            self.requests_sent += 1

    def _backoff(self, retry: int) -> float:
        ceiling = min(self.options.backoff_max_s, self.options.backoff_initial_s * 2 ** retry)
        return ceiling * random.uniform(0.5, 1.0)

    def _fetch_one(self, key: str, entry: dict, group: list[int], progress: BuildProgress, on_reply: OnReply) -> None:
        """Send one request (with retries), store its reply and deliver it; UNAVAILABLE after the last retry."""
        types = self._types
        thinking = (types.ThinkingConfig(thinking_budget=entry["thinking_budget"])
                    if "thinking_budget" in entry else None)
        config = types.GenerateContentConfig(
            temperature=entry["temperature"], seed=entry["seed"], max_output_tokens=entry["max_output_tokens"],
            candidate_count=1, thinking_config=thinking)
        last = "no attempt"
        try:
            for retry in range(self.options.max_retries + 1):
                self._take_request()
                progress.sent()
                delay = None
                try:
                    response = self._client.models.generate_content(
                        model=entry["model"], contents=entry["contents"], config=config)
                    reply = reply_from_response(response)
                except Exception as error:  # noqa: BLE001 - sorted into retriable and fatal below
                    status = getattr(error, "code", None)
                    if isinstance(status, int) and hasattr(error, "response"):    # an HTTP error status
                        with self._lock:
                            self.responses_received += 1
                        if status not in RETRIABLE_STATUS:
                            message = getattr(error, "message", None) or str(error)
                            raise GeminiError(redact(f"Gemini API error HTTP {status} for model {entry['model']!r}: "
                                                     f"{message}", self._key)) from None
                        last, delay = f"HTTP {status}", _retry_after_seconds(error)
                        if delay is not None:
                            delay = min(delay, self.options.retry_after_cap_s) + random.uniform(0, 0.05)
                    else:
                        kind = _classify_exception(error)
                        if kind is None:
                            raise GeminiError(redact(f"Gemini request failed: {type(error).__name__}: {error}",
                                                     self._key)) from None
                        if kind == "malformed":
                            with self._lock:
                                self.responses_received += 1
                        last = kind
                else:
                    with self._lock:
                        self.responses_received += 1
                        self.replies_stored += 1
                    self.cache.put(entry, reply)
                    self._account(reply, progress)
                    self._deliver(key, group, on_reply)
                    return
                if retry < self.options.max_retries and self._stop.wait(delay if delay is not None else self._backoff(retry)):
                    return   # the build is stopping
        except _Stopped:
            return
        if last == "connection" and self.responses_received == 0:
            raise GeminiUnreachable(f"cannot reach {safe_url(self.options.base_url)}: connection failed "
                                    f"{self.options.max_retries + 1} times")
        for position in group:
            on_reply(position, Reply("", UNAVAILABLE))

    def _account(self, reply: dict, progress: BuildProgress) -> None:
        usage = reply.get("usage") or {}
        inputs, outputs = usage.get("input", 0), usage.get("output", 0) + usage.get("thoughts", 0)
        cost = (inputs * self.options.price_input_per_m + outputs * self.options.price_output_per_m) / 1e6
        progress.usage(inputs, outputs, cost)


class _Stopped(Exception):
    """The build is stopping (budget, a fatal error elsewhere, Ctrl-C): send nothing more."""


def options_summary(options: GeminiOptions) -> dict:
    """The options as plain values for a config log; the base URL reduced to scheme://host:port."""
    values = asdict(options)
    values["base_url"] = safe_url(options.base_url) if options.base_url else None
    return values
