"""The sweep's own files on a local folder or on a URI (s3://bucket/prefix, gs://bucket/prefix, ...).

Ray Tune and Train write their checkpoints to `--storage-path` through `pyarrow.fs`; this module
sends the project's own files (probe sets, SFT warm-ups, reference log-probs, final models,
`sweep_state.json`) to the same place, through the same layer. A URI may carry pyarrow's options
as a query, e.g. `s3://bucket/runs?endpoint_override=host:9000&scheme=http`; `join` keeps the query
at the end. Credentials come from the usual chain of the store (environment, config files,
instance roles), never from the URI.

Readers that need real files (`from_pretrained`, `np.load`) call `local_copy`: a remote folder or
file is downloaded once per node into a node-local cache, keyed by the URI and by the listing of
what is there (names, sizes, modification times), so a changed folder is fetched again. Several
processes of one node may ask at once: one downloads (under a file lock) into a staging folder
that is renamed into place when whole; the others wait and reuse it.

For a plain local path (or a file:// URI) every function does the plain local thing. No Ray in
here: Ray Train workers, rollout actors and Ray tasks import it alike.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # no POSIX locks (Windows): concurrent copies may repeat a download, never mix two
    fcntl = None

# TrainConfig fields that name folders or files a worker reads; `local_inputs` localises them
INPUT_FIELDS = ("init_checkpoint", "probe_set_dir", "reward")


def _split(path) -> urllib.parse.SplitResult | None:
    text = str(path)
    return urllib.parse.urlsplit(text) if "://" in text else None


def is_uri(path) -> bool:
    return _split(path) is not None


def is_remote(path) -> bool:
    """True for a URI of a store other than the local disk (s3://, gs://, hdfs://, ...)."""
    parts = _split(path)
    return parts is not None and parts.scheme != "file"


def _local(path) -> str:
    """The plain local path of a local path or file:// URI."""
    parts = _split(path)
    return urllib.parse.unquote(parts.path) if parts is not None else str(path)


def join(base, *parts) -> str:
    """`base/part/...`: os.path.join for local paths; for a URI the parts go into its path, before any query."""
    split = _split(base)
    if split is None:
        return os.path.join(str(base), *map(str, parts))
    path = "/".join([split.path.rstrip("/"), *(str(p).strip("/") for p in parts)])
    return urllib.parse.urlunsplit(split._replace(path=path))


def _filesystem(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def exists(path) -> bool:
    if not is_remote(path):
        return os.path.exists(_local(path))
    import pyarrow.fs

    fs, fs_path = _filesystem(str(path))
    return fs.get_file_info(fs_path).type != pyarrow.fs.FileType.NotFound


def read_text(path) -> str:
    if not is_remote(path):
        return Path(_local(path)).read_text(encoding="utf-8")
    fs, fs_path = _filesystem(str(path))
    try:
        with fs.open_input_stream(fs_path) as stream:
            return stream.read().decode("utf-8")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path}: not found") from error


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` survive a power loss (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, suffix: str = "") -> Iterator[Path]:
    """A temporary local path beside `path` for a writer that wants a file name (np.savez, torch.save);
    when the block ends without an error the file is fsynced and renamed over `path`, then the folder
    is fsynced, so a reader (or a crash) sees the old file or the new one whole, never a part."""
    target = Path(_local(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(handle)
    try:
        yield Path(staging)
        with open(staging, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(staging, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise
    _fsync_dir(target.parent)


def write_bytes(path, data: bytes) -> None:
    """Write a file whole: a reader sees the old content or the new, never a part (the one atomic write).

    Locally through `atomic_path` (temporary file, fsync, rename, fsync of the folder); an object
    store makes an object visible only once its upload has finished."""
    if not is_remote(path):
        with atomic_path(path) as staging:
            staging.write_bytes(data)
        return
    fs, fs_path = _filesystem(str(path))
    with fs.open_output_stream(fs_path) as stream:
        stream.write(data)


def write_text(path, text: str) -> None:
    """`write_bytes` of UTF-8 text (markers and state files)."""
    write_bytes(path, text.encode("utf-8"))


def replace_dir(staging, target) -> None:
    """Put the finished local folder `staging` at `target` (same file system), replacing any folder there.

    A new `target` is one rename. An existing one is first renamed aside and removed only once the
    new folder is in place; a crash between the two renames leaves the old folder beside the target
    under `.<name>.replaced-*`, which `restore_replaced_dir` puts back, so the old content is never lost."""
    staging, target = Path(staging), Path(_local(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.rename(staging, target)
        _fsync_dir(target.parent)
        return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.replaced-"))
    os.rename(target, aside / target.name)
    os.rename(staging, target)
    _fsync_dir(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def publish_dir(staging, target) -> bool:
    """Rename the finished local folder `staging` to `target` unless another process published it first
    (then `staging` is removed: same inputs, same content). True when this call published it."""
    staging, target = Path(staging), Path(_local(target))
    try:
        os.rename(staging, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
        return False
    _fsync_dir(target.parent)
    return True


def restore_replaced_dir(target) -> bool:
    """After a crash inside `replace_dir`: put the folder that was set aside back at `target` when
    nothing is there; True when it did."""
    target = Path(_local(target))
    if target.exists() or not target.parent.is_dir():
        return False
    for aside in sorted(target.parent.glob(f".{target.name}.replaced-*")):
        if (aside / target.name).is_dir():
            os.rename(aside / target.name, target)
            _fsync_dir(target.parent)
            shutil.rmtree(aside, ignore_errors=True)
            return True
    return False


def upload_file(local, destination) -> None:
    """Copy one local file to `destination` (a file path or URI, not a folder)."""
    if not is_remote(destination):
        target = Path(_local(destination))
        if Path(local).resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, target)
        return
    _copy_to_remote(str(local), str(destination))


def upload_dir(local, destination) -> None:
    """Copy a local folder's content (recursively) into `destination`; files already there are overwritten."""
    if not Path(local).is_dir():
        raise NotADirectoryError(f"{local}: not a folder")
    if not is_remote(destination):
        target = Path(_local(destination))
        if Path(local).resolve() != target.resolve():
            shutil.copytree(local, target, dirs_exist_ok=True)
        return
    _copy_to_remote(str(local), str(destination))


def _copy_to_remote(local: str, destination: str) -> None:
    import pyarrow.fs

    fs, fs_path = _filesystem(destination)
    pyarrow.fs.copy_files(os.path.abspath(local), fs_path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs)


@contextlib.contextmanager
def output_dir(destination) -> Iterator[str]:
    """A local folder to write `destination`'s files into: the folder itself when it is local, else a
    temporary folder uploaded to `destination` when the block ends without an error."""
    if not is_remote(destination):
        yield _local(destination)
        return
    with tempfile.TemporaryDirectory(prefix="probesweep-upload-") as staging:
        yield staging
        upload_dir(staging, destination)


def cache_root() -> Path:
    """The project's node-local cache (tokenizers, probe-set builds, downloaded copies under `storage/`):
    $PROBESWEEP_CACHE, else ~/.cache/probesweep."""
    return Path(os.environ.get("PROBESWEEP_CACHE") or Path.home() / ".cache" / "probesweep")


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        yield


CACHE_LIMIT_ENV = "PROBESWEEP_STORAGE_CACHE_GB"  # the sweep's --storage-cache-gb, passed to every node


def cache_limit_bytes() -> int | None:
    """The node-local storage cache's size limit from the environment (unset or empty: no limit)."""
    text = os.environ.get(CACHE_LIMIT_ENV, "").strip()
    return int(float(text) * 2**30) if text else None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def prune_cache(root, max_bytes: int, keep=()) -> list[str]:
    """Remove the least recently used finished copies under `root` until their total size is at most
    `max_bytes` (`keep`: names never removed, e.g. the copy just handed out). A copy is first renamed
    aside, so a process that opens it by name sees it whole or not at all; one that already has its
    files open keeps reading them. Returns the names removed."""
    root = Path(root)
    entries = [p for p in root.iterdir() if not p.name.startswith(".")] if root.is_dir() else []
    sizes = {p: _size(p) for p in entries}
    total = sum(sizes.values())
    removed = []
    for entry in sorted(entries, key=lambda p: p.stat().st_mtime_ns):  # least recently used first
        if total <= max_bytes:
            break
        if entry.name in keep:
            continue
        aside = root / f".{entry.name}.pruned-{os.getpid()}"
        try:
            os.rename(entry, aside)
        except OSError:  # another process pruned it first
            continue
        shutil.rmtree(aside, ignore_errors=True)
        total -= sizes[entry]
        removed.append(entry.name)
    return removed


def _used(target: Path, root: Path) -> None:
    """Mark a cached copy as just used (its modification time orders the pruning), then keep the cache
    within its limit."""
    with contextlib.suppress(OSError):
        os.utime(target)
    limit = cache_limit_bytes()
    if limit is not None:
        prune_cache(root, limit, keep={target.name})


def local_copy(path, cache_dir=None):
    """A local path with the content of `path`: unchanged when it is local (None stays None), else a
    node-local copy of the remote file or folder, downloaded on first use."""
    if path is None or not is_remote(path):
        return _local(path) if is_uri(path) else path
    import pyarrow.fs

    uri = str(path)
    fs, fs_path = _filesystem(uri)
    info = fs.get_file_info(fs_path)
    if info.type == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: not found")
    is_file = info.type == pyarrow.fs.FileType.File
    listing = [info] if is_file else fs.get_file_info(pyarrow.fs.FileSelector(fs_path, recursive=True))
    if not is_file and not any(entry.type == pyarrow.fs.FileType.File for entry in listing):
        raise FileNotFoundError(f"{uri}: an empty folder")
    digest = hashlib.sha256(uri.encode())
    for entry in sorted(listing, key=lambda e: e.path):
        digest.update(f"\0{entry.path}\0{entry.type}\0{entry.size}\0{entry.mtime_ns}".encode())
    name = Path(fs_path.rstrip("/")).name or "root"
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "storage"
    target = root / f"{name}-{digest.hexdigest()[:20]}"  # the finished copy; it exists only when whole
    result = target / name if is_file else target
    if target.exists():
        _used(target, root)
        return str(result)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{target.name}.lock"):
        if not target.exists():  # nobody finished it while this process waited for the lock
            staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.staging-"))
            try:
                pyarrow.fs.copy_files(fs_path, str(staging / name) if is_file else str(staging), source_filesystem=fs,
                                      destination_filesystem=pyarrow.fs.LocalFileSystem())
                os.rename(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                if not target.exists():
                    raise
    _used(target, root)
    return str(result)


def local_inputs(config, names=INPUT_FIELDS):
    """The config (a dataclass such as TrainConfig) with every remote input folder among `names` replaced
    by its node-local copy; the same object when there is nothing to fetch."""
    changes = {n: local_copy(getattr(config, n)) for n in names if is_remote(getattr(config, n) or "")}
    return dataclasses.replace(config, **changes) if changes else config
