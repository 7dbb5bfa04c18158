"""A real full disk (a 1 MiB tmpfs; skipped where mounting is not permitted): an atomic write that runs out
of space raises ENOSPC naming nothing half-written, the old file stays whole and no temporary is left."""
from __future__ import annotations

import errno
import os
import subprocess
import uuid

import pytest

from infra import storage


@pytest.fixture()
def small_disk(tmp_path):
    mount_point = tmp_path / f"full-{uuid.uuid4().hex[:6]}"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (or CAP_SYS_ADMIN)")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_a_write_that_fills_the_disk_keeps_the_old_file_whole(small_disk):
    state = small_disk / "sweep_state.json"
    storage.write_text(state, '{"parent_run_id": "abc"}')
    with pytest.raises(OSError) as error:
        storage.write_bytes(state, b"x" * (2 * 2**20))  # twice the disk
    assert error.value.errno == errno.ENOSPC
    assert state.read_text() == '{"parent_run_id": "abc"}'
    assert sorted(os.listdir(small_disk)) == ["sweep_state.json"]  # no temporary left to fill the disk
    storage.write_text(state, '{"parent_run_id": "def"}')  # space came back: the next write works
    assert state.read_text() == '{"parent_run_id": "def"}'
