"""Typed settings on the command line: every entry point's flags come from dataclass fields.

A field made with `setting(...)` carries its help text, its allowed values (`choices`) or numeric
range (`Range`), and optionally its flag name. `add_settings` turns a dataclass (and its nested
sections) into an argparse group whose `--help` shows the caller's own defaults; `check_ranges`
is what a dataclass calls in `__post_init__`, so a bad value is stopped when the config is made,
with one message naming the flag and the allowed range. `Parser` reports a user error in one line.
Only the standard library is imported here, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from typing import Any, Mapping


@dataclass(frozen=True)
class Range:
    """A closed or open interval; values must also be finite (nan and inf are never accepted)."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return "a finite number"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
FINITE = Range()


def setting(default, help: str, *, choices: tuple | None = None, range: Range | None = None, flag: str | None = None,
            **metadata):
    """A dataclass field with its command-line description; lists get a fresh copy per instance."""
    meta = {"help": help, **metadata}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if range is not None:
        meta["range"] = range
    if flag is not None:
        meta["flag"] = flag
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    if is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_ranges(obj) -> None:
    """Every numeric field (or list element) within its Range and every choice among its choices."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if "choices" in f.metadata:
            for v in values:
                if v not in f.metadata["choices"]:
                    raise ValueError(f"{flag_of(f)} must be one of {', '.join(map(str, f.metadata['choices']))}; got {v!r}")
        allowed: Range | None = f.metadata.get("range")
        if allowed is None:
            continue
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not allowed.contains(float(v)):
                raise ValueError(f"{flag_of(f)} must be a finite number {allowed.describe()}, got {v}")


class Parser(argparse.ArgumentParser):
    """An argparse parser whose user errors are one line (no usage block, no traceback), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class Fixed(argparse.Action):
    """A flag the entry point fixes: refused with the reason instead of being silently overridden."""

    def __init__(self, option_strings, dest, reason: str = "", **kwargs):
        self.reason = reason
        super().__init__(option_strings, dest, nargs="*", help=argparse.SUPPRESS, default=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.reason}")


def _scalar_type(annotation):
    """int | None -> int; list[float] stays list[float]; bool stays bool."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0])
    return annotation


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def is_section(f) -> bool:
    return bool(f.metadata.get("section"))


def add_settings(parser: argparse.ArgumentParser, cls, title: str, defaults=None,
                 fixed: Mapping[str, str] | None = None, skip: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """Flags for `cls`'s fields (a nested section's fields join the same group), their help showing
    `defaults` (an instance; the class defaults otherwise). `fixed`: option name -> why it is refused.
    Returns option name (the flag's dest) -> attribute path, e.g. rollout_actors -> (rollout, num_actors)."""
    group = parser.add_argument_group(title)
    groups = {title: group}   # a field's metadata may name a group of its own (e.g. "validation")
    paths: dict[str, tuple[str, ...]] = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else None)
        if is_section(f):
            for name, path in add_settings(parser, hints[f.name], f"{title}: {f.name}", default, fixed).items():
                paths[name] = (f.name, *path)
            continue
        flag = flag_of(f)
        dest = flag.lstrip("-").replace("-", "_")
        paths[dest] = (f.name,)
        group_title = f.metadata.get("group", title)
        if group_title not in groups:
            groups[group_title] = parser.add_argument_group(group_title)
        target = groups[group_title]
        if fixed and dest in fixed:
            target.add_argument(flag, dest=dest, action=Fixed, reason=fixed[dest])
            continue
        annotation = _scalar_type(hints[f.name])
        help_text = f.metadata.get("help", "") + ("" if f.metadata.get("required") else f" (default: {default})")
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        if typing.get_origin(annotation) is list:
            kwargs.update(nargs="+", type=typing.get_args(annotation)[0], metavar="V")
        elif annotation is bool and f.metadata.get("negate"):
            kwargs.update(action="store_false", help=f.metadata.get("help", ""))
        elif annotation is bool:
            kwargs.update(type=parse_bool, metavar="BOOL", nargs="?", const=True)  # `--resume` alone means true
        else:
            kwargs.update(type=annotation)
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        if f.metadata.get("required"):
            kwargs.update(required=True, default=None)
        target.add_argument(flag, *f.metadata.get("aliases", ()), **kwargs)
    return paths


def with_values(instance, values: Mapping[tuple[str, ...], Any]):
    """A copy of `instance` with values set by attribute path (nested sections rebuilt), validated
    again by the dataclasses' own `__post_init__`."""
    top: dict[str, Any] = {}
    nested: dict[str, dict[tuple[str, ...], Any]] = {}
    for path, value in values.items():
        if len(path) == 1:
            top[path[0]] = value
        else:
            nested.setdefault(path[0], {})[path[1:]] = value
    for name, inner in nested.items():
        top[name] = with_values(getattr(instance, name), inner)
    return replace(instance, **top) if top else instance


LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_loopback_uri(uri: str | None) -> bool:
    """True for a URI whose host is this machine's loopback (127.0.0.0/8, ::1, localhost): reachable only
    from the machine that resolves it, so from no other node of a cluster."""
    import ipaddress
    import urllib.parse

    if not uri or "://" not in uri:
        return False
    try:
        host = urllib.parse.urlsplit(uri).hostname
    except ValueError:
        return False
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def remote_trials_tracking_problem(tracking_uri: str | None, trials_on_head: bool) -> str | None:
    """One line when trial processes may run on other nodes but log to a loopback MLflow server."""
    if trials_on_head or not is_loopback_uri(tracking_uri):
        return None
    return (f"--trials-on-head false with --tracking-uri {tracking_uri}: trial processes on other nodes cannot reach "
            "a loopback address (it is each node's own); keep --trials-on-head true (the default), or give an "
            "address every node reaches")
