"""Resume from the newest readable checkpoint a trial kept, not only the one Ray Train hands over.

Ray Train gives a restarted worker group just its latest checkpoint; with `--checkpoints-to-keep`
of 2 or more the earlier ones still sit beside it in the trial's storage folder. When the latest is
unreadable (cut short by a failed upload, corrupt), they are tried newest first, each skipped one
named in a warning (`PolicyTrainer.load_latest_readable_checkpoint`); when none reads, one
CheckpointError names every file. Every rank walks the same list over the same files, so the ranks
agree on where they resume.
"""
from __future__ import annotations

import contextlib
import posixpath
from typing import Iterator

CHECKPOINT_PREFIX = "checkpoint_"   # Ray Train names each checkpoint folder checkpoint_<timestamp>


def earlier_checkpoints(latest):
    """The checkpoints kept beside `latest` (a ray.train.Checkpoint) that are older than it, newest first.

    Ray Train names checkpoint folders by a fixed-width timestamp, so name order is time order; a
    folder named later than `latest` was never registered (a crash mid-upload) and is left out."""
    import pyarrow.fs
    from ray.train import Checkpoint

    path = latest.path.rstrip("/")
    parent, name = posixpath.split(path)
    if not name.startswith(CHECKPOINT_PREFIX):
        return []  # not a folder of Ray Train's own naming: nothing to order it by
    entries = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent, allow_not_found=True))
    names = sorted((entry.base_name for entry in entries
                    if entry.type == pyarrow.fs.FileType.Directory and entry.base_name.startswith(CHECKPOINT_PREFIX)
                    and entry.base_name < name), reverse=True)
    return [Checkpoint(posixpath.join(parent, other), filesystem=latest.filesystem) for other in names]


def _local_folders(checkpoints, stack: contextlib.ExitStack) -> Iterator[str]:
    """Each checkpoint as a local folder, fetched only when the one before it failed (remote storage)."""
    for checkpoint in checkpoints:
        yield stack.enter_context(checkpoint.as_directory())


def restore_newest_readable(trainer, latest) -> str:
    """Load the newest readable of `latest` and the checkpoints kept before it into `trainer` (its
    `load_latest_readable_checkpoint`); returns the storage path of the one used. Raises the trainer's
    CheckpointError, naming every file tried, when none reads."""
    candidates = [latest, *earlier_checkpoints(latest)]
    with contextlib.ExitStack() as stack:
        folders: list[str] = []

        def fetched() -> Iterator[str]:
            for folder in _local_folders(candidates, stack):
                folders.append(folder)
                yield folder

        used = trainer.load_latest_readable_checkpoint(fetched())
        return candidates[folders.index(used)].path
