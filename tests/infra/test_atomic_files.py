"""The one atomic write, the folder swap and the one cache root of infra.storage (local disk)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra import storage


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_write_text_replaces_whole_and_fsyncs_file_and_folder(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "state.json"
    storage.write_text(target, "old")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    storage.write_text(target, "new")
    assert target.read_text() == "new"
    assert _leftovers(target.parent) == []
    assert str(target.parent) in synced                       # the folder, after the rename
    assert any(Path(p).parent == target.parent and Path(p).name.startswith(".state.json.") for p in synced)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "marker"
    storage.write_text(target, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with storage.atomic_path(target) as staging:
            staging.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_replace_dir_swaps_a_folder(tmp_path):
    target, staging = tmp_path / "set", tmp_path / ".staging"
    target.mkdir(), staging.mkdir()
    (target / "a").write_text("old")
    (staging / "a").write_text("new")
    storage.replace_dir(staging, target)
    assert (target / "a").read_text() == "new" and not staging.exists()
    assert _leftovers(tmp_path) == []


def test_a_crash_between_the_renames_of_replace_dir_loses_nothing(tmp_path, monkeypatch):
    target, staging = tmp_path / "set", tmp_path / ".staging"
    target.mkdir(), staging.mkdir()
    (target / "a").write_text("old")
    (staging / "a").write_text("new")
    real_rename, calls = os.rename, []

    def crash_on_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        storage.replace_dir(staging, target)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not target.exists()                                 # the window the crash hit
    assert storage.restore_replaced_dir(target)
    assert (target / "a").read_text() == "old"
    assert not storage.restore_replaced_dir(target)            # nothing left to restore


def test_publish_dir_keeps_the_first_copy(tmp_path):
    target = tmp_path / "tok"
    first, second = tmp_path / ".a", tmp_path / ".b"
    for folder, text in ((first, "1"), (second, "2")):
        folder.mkdir()
        (folder / "f").write_text(text)
    assert storage.publish_dir(first, target) is True
    assert storage.publish_dir(second, target) is False
    assert (target / "f").read_text() == "1" and not second.exists()


def test_one_cache_root_for_tokenizers_and_downloads(tmp_path, monkeypatch):
    from trainers.data import tokenizer

    monkeypatch.setenv("PROBESWEEP_CACHE", str(tmp_path / "cache"))
    assert storage.cache_root() == tmp_path / "cache"
    assert not hasattr(tokenizer, "cache_root")
    built = tokenizer.builtin_tokenizer(vocab_size=300)
    assert Path(built.name_or_path).parent == tmp_path / "cache" / "tokenizers"
    monkeypatch.delenv("PROBESWEEP_CACHE")
    assert storage.cache_root() == Path.home() / ".cache" / "probesweep"
