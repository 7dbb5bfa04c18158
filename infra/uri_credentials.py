"""Credentials never ride in a URI: a sweep records its URIs verbatim (MLflow params, resolved_config.yaml,
sweep_state.json, error text), so a `s3://KEY:SECRET@bucket/...` or `http://user:password@host` would
spread the secret everywhere. `refuse_credentials` stops such a value when the config is made, with a
message that names the flag and where credentials belong, and never repeats the value itself.
Only the standard library is imported here (it runs at parse time).
"""
from __future__ import annotations

import urllib.parse
from dataclasses import fields, is_dataclass

# query keys that carry a secret in the URI options of pyarrow's file systems and of common stores
SECRET_QUERY_KEYS = frozenset({"access_key", "secret_key", "session_token", "access_token", "token", "password",
                               "passwd", "secret", "credential", "credentials", "sig", "signature", "sas_token",
                               "api_key", "apikey", "client_secret"})

TRACKING_FIELDS = ("tracking_uri",)
WHERE_TRACKING = ("give MLflow credentials through the environment (MLFLOW_TRACKING_USERNAME and "
                  "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN)")
WHERE_STORAGE = ("give store credentials through the environment (e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                 "GOOGLE_APPLICATION_CREDENTIALS), the store's config files (~/.aws/credentials) or the node's role")


def credentials_in(value: str) -> str | None:
    """What kind of credential `value` carries as a URI (None: none). Never returns the secret."""
    if "://" not in value:
        return None
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:  # e.g. a malformed IPv6 host; still look for the user part by hand
        parts = None
    netloc = parts.netloc if parts is not None else value.split("://", 1)[1].split("/", 1)[0]
    if "@" in netloc:
        return "a user name or password before '@'"
    host_port = netloc.rsplit(":", 1)
    if len(host_port) == 2 and host_port[1] and not host_port[1].isdigit() and not netloc.endswith("]"):
        return "a 'user:password' part"  # a secret with a '/' in it splits the user part from its '@'
    if parts is not None:
        for key, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if key.lower() in SECRET_QUERY_KEYS:
                return f"the query option {key!r}"
    return None


def _flag(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def refuse_credentials(config) -> None:
    """Raise ValueError naming the flag when a string field of the dataclass `config` (or of its nested
    sections, or a list element) is a URI with credentials in it."""
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            refuse_credentials(value)
            continue
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str):
                continue
            found = credentials_in(item)
            if found:
                where = WHERE_TRACKING if f.name in TRACKING_FIELDS else WHERE_STORAGE
                raise ValueError(f"{_flag(f)}: the URI carries credentials ({found}); they would be recorded in "
                                 f"MLflow params and the sweep's state files, so URIs with credentials are refused: "
                                 f"{where}")
