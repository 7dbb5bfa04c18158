"""An append-only cache of LLM replies, so a build that stops anywhere resumes without asking twice.

Format: one JSON object per line in `replies.jsonl`, written with a single `write` on a file opened
for appending, then flushed to disk, as soon as the reply arrives:

    {"v": 1, "key": "<sha256 of request>", "request": {...}, "reply": {...}, "checksum": "<sha256>"}

`request` holds everything that shapes the reply (model, template kind, the rendered prompt,
temperature, seed, output limit), never a credential; `key` is the SHA-256 of its canonical JSON,
and `checksum` the SHA-256 of key, request and reply together. On load, a line that is not valid
JSON (a write cut short by a crash), lacks a field, or whose key or checksum does not match is
reported and ignored, so its request is sent again; it is never used. A later line for the same key
wins. Rejected replies are stored too: the attempt number changes the seed (so the key), which is
why a rerun neither reuses a rejected reply for the next attempt nor asks for it again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Mapping

FORMAT = 1
CACHE_FILE = "replies.jsonl"
log = logging.getLogger(__name__)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def request_key(request: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(request)).hexdigest()


def _checksum(key: str, request: Mapping[str, Any], reply: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical({"key": key, "request": request, "reply": reply})).hexdigest()


class ReplyCache:
    """Replies by request key, loaded from and appended to `<directory>/replies.jsonl`."""

    def __init__(self, directory: str | Path, fsync: bool = True):
        self.directory = Path(directory)
        self.path = self.directory / CACHE_FILE
        self.fsync = fsync
        self.problems: list[str] = []          # one line per ignored entry, for the build report
        self._replies: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._load()

    def __len__(self) -> int:
        return len(self._replies)

    def __contains__(self, key: str) -> bool:
        return key in self._replies

    def get(self, key: str) -> dict | None:
        return self._replies.get(key)

    def put(self, request: Mapping[str, Any], reply: Mapping[str, Any]) -> str:
        """Store a reply durably (one appended line) and return its key."""
        request, reply = json.loads(_canonical(request)), json.loads(_canonical(reply))  # plain JSON copies
        key = request_key(request)
        line = json.dumps({"v": FORMAT, "key": key, "request": request, "reply": reply,
                           "checksum": _checksum(key, request, reply)}, ensure_ascii=False) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if self._needs_newline(fd):
                    data = b"\n" + data   # the previous write was cut short: start a fresh line
                os.write(fd, data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._replies[key] = reply
        return key

    def _needs_newline(self, fd: int) -> bool:
        size = os.fstat(fd).st_size
        if size == 0:
            return False
        with open(self.path, "rb") as file:
            file.seek(size - 1)
            return file.read(1) != b"\n"

    def _load(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as file:
            for number, raw in enumerate(file, 1):
                if not raw.strip():
                    continue
                problem = self._accept(raw)
                if problem:
                    message = f"{self.path.name}, line {number}: {problem}; ignored, its request will be sent again"
                    self.problems.append(message)
                    log.warning("reply cache %s", message)

    def _accept(self, raw: bytes) -> str | None:
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "not valid JSON (a write cut short?)"
        if not isinstance(entry, dict):
            return "not a JSON object"
        missing = [name for name in ("v", "key", "request", "reply", "checksum") if name not in entry]
        if missing:
            return f"field(s) {missing} missing"
        if entry["v"] != FORMAT:
            return f"format {entry['v']!r}, expected {FORMAT}"
        request, reply = entry["request"], entry["reply"]
        if not isinstance(request, dict) or not isinstance(reply, dict) or not isinstance(reply.get("text"), str):
            return "request or reply malformed"
        if entry["key"] != request_key(request):
            return "key does not match its request"
        if entry["checksum"] != _checksum(entry["key"], request, reply):
            return "checksum does not match (the entry was changed)"
        self._replies[entry["key"]] = reply
        return None
