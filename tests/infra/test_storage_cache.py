"""Bounded growth: the node-local cache of remote files keeps within --storage-cache-gb by removing the
least recently used copies (never the one just handed out), and each trial keeps --checkpoints-to-keep
Ray Train checkpoints (at least 1; the default 2 leaves a fallback for a corrupt last one)."""
from __future__ import annotations

import os
import time

import pytest

from infra import storage

pytest.importorskip("moto.server", reason="the S3 test server: pip install -e '.[test]'")

BUCKET = "probesweep-test"  # the bucket of the s3 fixture (tests/infra/conftest.py)
MIB = 2**20


def remote_folder(s3, tmp_path, name: str) -> str:
    uri, _ = s3
    local = tmp_path / "upload" / name
    local.mkdir(parents=True)
    (local / "weights.bin").write_bytes(os.urandom(MIB))
    storage.upload_dir(local, uri(name))
    return uri(name)


def test_the_node_cache_keeps_within_its_limit_dropping_the_least_recently_used(s3, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first, second, third = (remote_folder(s3, tmp_path, n) for n in ("first", "second", "third"))
    monkeypatch.setenv(storage.CACHE_LIMIT_ENV, f"{2.5 * MIB / 2**30:.9f}")  # room for two 1 MiB copies
    copy_first = storage.local_copy(first, cache_dir=cache)
    time.sleep(0.01)
    copy_second = storage.local_copy(second, cache_dir=cache)
    time.sleep(0.01)
    assert storage.local_copy(first, cache_dir=cache) == copy_first  # a hit: `first` is now the most recent
    time.sleep(0.01)
    copy_third = storage.local_copy(third, cache_dir=cache)
    kept = sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))
    assert os.path.isdir(copy_first) and os.path.isdir(copy_third) and not os.path.exists(copy_second)
    assert len(kept) == 2 and sum(storage._size(cache / k) for k in kept) <= 2.5 * MIB
    again = storage.local_copy(second, cache_dir=cache)  # fetched again when asked for, another one goes
    assert os.path.isdir(again) and (os.path.getsize(os.path.join(again, "weights.bin")) == MIB)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


def test_without_a_limit_nothing_is_removed(s3, tmp_path, monkeypatch):
    monkeypatch.delenv(storage.CACHE_LIMIT_ENV, raising=False)
    cache = tmp_path / "cache"
    copies = [storage.local_copy(remote_folder(s3, tmp_path, f"keep-{i}"), cache_dir=cache) for i in range(3)]
    assert all(os.path.isdir(c) for c in copies)


def test_the_copy_just_used_is_kept_even_when_alone_over_the_limit(tmp_path):
    root = tmp_path / "cache"
    for name in ("old", "new"):
        (root / name).mkdir(parents=True)
        (root / name / "blob").write_bytes(b"x" * 1000)
    assert storage.prune_cache(root, 10, keep={"new"}) == ["old"]
    assert (root / "new" / "blob").exists()


def test_checkpoints_to_keep_and_the_cache_limit_are_flags_checked_at_parse_time(capsys):
    from sweeps.config import parse_config
    from sweeps.context import TrialContext
    from sweeps.trial import checkpoint_config

    config = parse_config(["--checkpoints-to-keep", "3", "--storage-cache-gb", "20"], "test")
    assert (config.checkpoints_to_keep, config.storage_cache_gb) == (3, 20.0)
    assert parse_config([], "test").checkpoints_to_keep == 2
    context = TrialContext("sqlite:///x.db", "1", "p", "/s", "n", 1, "h", ("chosen",), checkpoints_to_keep=3)
    assert checkpoint_config(context).num_to_keep == 3
    for argv, message in ((["--checkpoints-to-keep", "0"], "--checkpoints-to-keep must be a finite number >= 1, got 0"),
                          (["--storage-cache-gb", "0"], "--storage-cache-gb must be a finite number > 0")):
        with pytest.raises(SystemExit):
            parse_config(argv, "test")
        assert message in capsys.readouterr().err
