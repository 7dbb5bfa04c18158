"""Writing derived probes in rounds: ask every writer, validate, ask again for what was rejected.

A writer (Gemini, a local LM, the rule tables) turns ProbeRequests into Replies for one attempt
number; the attempt changes its seed and temperature, so a new attempt can give a new reply.
Round k sends every probe still without a valid reply to its category's writer with attempt k;
each reply is validated as it arrives (so the progress bar moves), and after `max_attempts` rounds
what is left is a failure, with the reason of each attempt.
"""
from __future__ import annotations

import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

from probes.templates import ProbeRequest
from probes.validation import ValidationRules, reject_reason


@dataclass(frozen=True)
class Reply:
    text: str
    problem: str | None = None     # set when the writer got no usable text (blocked, truncated, unavailable)


OnReply = Callable[[int, Reply], None]


class ReplyWriter(Protocol):
    name: str                      # recorded in the manifest as the generator of its categories

    def write(self, requests: Sequence[ProbeRequest], attempt: int, progress: "BuildProgress",
              on_reply: OnReply) -> None:
        """Call on_reply(i, reply) once for every requests[i], as each reply is ready (from any thread)."""

    def describe(self) -> dict: ...    # what the manifest records about it (model, sampling)


@dataclass
class Outcome:
    text: str | None = None
    rejections: list[str] = field(default_factory=list)   # reason per rejected attempt, in order


class BuildProgress:
    """A tqdm bar over probes: done / cached / failed, requests sent and the estimated cost so far."""

    def __init__(self, total: int, enabled: bool = True, description: str = "probes"):
        from tqdm import tqdm

        self._lock = threading.Lock()
        self.done = self.failed = self.cached = self.requests = 0
        self.input_tokens = self.output_tokens = 0
        self.cost = 0.0
        self.show_cost = False
        self._bar = tqdm(total=total, desc=description, unit="probe", disable=not enabled, file=sys.stderr,
                         dynamic_ncols=True, mininterval=0.2)

    def _refresh(self) -> None:
        postfix = {"done": self.done, "cached": self.cached, "failed": self.failed}
        if self.show_cost:
            postfix.update(requests=self.requests, cost=f"${self.cost:.4f}")
        self._bar.set_postfix(postfix, refresh=False)

    def finished(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.done += 1
            else:
                self.failed += 1
            self._refresh()
            self._bar.update(1)

    def served_from_cache(self, n: int = 1) -> None:
        with self._lock:
            self.cached += n
            self._refresh()

    def sent(self) -> None:
        with self._lock:
            self.requests += 1
            self.show_cost = True
            self._refresh()

    def usage(self, input_tokens: int, output_tokens: int, cost: float) -> None:
        with self._lock:
            self.input_tokens += input_tokens
            self.output_tokens += output_tokens
            self.cost += cost
            self._refresh()
            self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def write_validated(requests: Sequence[ProbeRequest], writers: Mapping[str, ReplyWriter], rules: ValidationRules,
                    max_attempts: int, progress: BuildProgress) -> list[Outcome]:
    """One Outcome per request: the first reply that passed validation, or every attempt's reason."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    outcomes = [Outcome() for _ in requests]
    lock = threading.Lock()
    pending = list(range(len(requests)))
    for attempt in range(max_attempts):
        last = attempt == max_attempts - 1
        groups: dict[int, list[int]] = {}
        for i in pending:
            groups.setdefault(id(writers[requests[i].category]), []).append(i)
        for members in groups.values():
            writer = writers[requests[members[0]].category]
            answered: set[int] = set()

            def on_reply(position: int, reply: Reply, members=members, answered=answered, last=last) -> None:
                i = members[position]
                reason = reply.problem or reject_reason(reply.text, requests[i].source, rules)
                with lock:
                    if i in answered:
                        raise RuntimeError(f"two replies for request {i}")
                    answered.add(i)
                    if reason is None:
                        outcomes[i].text = reply.text
                    else:
                        outcomes[i].rejections.append(reason)
                if reason is None or last:
                    progress.finished(ok=reason is None)

            writer.write([requests[i] for i in members], attempt, progress, on_reply)
            if len(answered) != len(members):
                raise RuntimeError(f"writer {writer.name} answered {len(answered)} of {len(members)} requests")
        pending = [i for i in pending if outcomes[i].text is None]
        if not pending:
            break
    return outcomes


def rejection_counts(outcomes: Sequence[Outcome]) -> dict[str, int]:
    return dict(sorted(Counter(reason for outcome in outcomes for reason in outcome.rejections).items()))
