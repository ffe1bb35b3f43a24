"""The one place that decides local path vs object-store URL (s3://, gs://, file://, ...).

Everything that reads or writes shards, runs, checkpoints or reports goes through here, so
a local folder, an NFS mount and a bucket behave alike. URLs go through fsspec (s3fs /
gcsfs for the clouds; they honour the standard AWS_* / Google credentials); local paths
use plain file IO, which is faster for the loader's large sequential reads.
"""

from __future__ import annotations

import contextlib
import json
import math
import posixpath
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
import numpy as np


def is_url(path: str) -> bool:
    """True for scheme://... (object stores and file://), False for a plain local path."""
    return "://" in str(path)


def local_path(path: str) -> Path | None:
    """The local file-system path behind `path` (file:// stripped), None for a remote URL."""
    path = str(path)
    if not is_url(path):
        return Path(path)
    if path.startswith("file://"):
        return Path(path.removeprefix("file://"))
    return None


def join(root: str, *names: str) -> str:
    """`root` may be a local folder or an object-store prefix (s3://bucket/prefix)."""
    if is_url(root):
        return posixpath.join(str(root), *names)
    return str(Path(root, *names))


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers do not share the driver's cwd); URLs as given."""
    return str(path) if is_url(path) else str(Path(path).resolve())


def _fs(url: str):
    # No listings cache: other processes (Ray Train's workers, another node) write the same
    # prefixes, and a cached listing would hide their new checkpoints.
    return fsspec.core.url_to_fs(str(url), use_listings_cache=False)


def exists(url: str) -> bool:
    fs, path = _fs(url)
    return fs.exists(path)


def size(url: str) -> int | None:
    """Bytes of a file, None if it does not exist."""
    fs, path = _fs(url)
    try:
        return int(fs.size(path))
    except FileNotFoundError:
        return None


def fingerprint(url: str) -> str | None:
    """What changes when a file's content does: size and mtime locally, size and the
    object store's ETag (or modification time) remotely; None if neither is known."""
    local = local_path(url)
    if local is not None:
        info = local.stat()
        return f"{info.st_size}:{info.st_mtime_ns}"
    fs, path = _fs(url)
    info = fs.info(path)
    mark = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
    return None if mark is None else f"{info.get('size')}:{mark}"


def list_names(root: str, dirs: bool = False) -> list[str]:
    """Names directly inside a folder or prefix: its files, or with dirs its folders
    ([] if it does not exist)."""
    fs, path = _fs(root)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    kind = "directory" if dirs else "file"
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == kind)


def remove(url: str) -> None:
    """Delete a file or a whole folder (nothing if it is not there)."""
    fs, path = _fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def open_file(url: str, mode: str = "rb") -> IO:
    """A seekable file object; the caller closes it. Local paths with plain buffered IO."""
    local = local_path(url)
    if local is not None:
        return open(local, mode, buffering=1 << 20 if "b" in mode else -1)  # noqa: SIM115
    return fsspec.open(str(url), mode).open()


def upload(local: Path, url: str) -> None:
    """Copy one local file to `url` (an object-store URL or a local path), replacing it."""
    target = local_path(url)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
    fs, path = _fs(url)
    fs.put_file(str(local), path)


def makedirs(url: str) -> None:
    fs, path = _fs(url)
    fs.makedirs(path, exist_ok=True)


def read_text(url: str) -> str:
    with open_file(url, "r") as stream:
        return stream.read()


def write_text(url: str, text: str) -> None:
    """Write a whole file, creating its folder. Local files are replaced atomically."""
    local = local_path(url)
    if local is None:
        with fsspec.open(str(url), "w") as stream:
            stream.write(text)
        return
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(local.name + ".partial")
    tmp.write_text(text)
    tmp.replace(local)


def read_json(url: str) -> Any:
    return json.loads(read_text(url))


def jsonable(value: Any) -> Any:
    """Strict-JSON form: NaN / inf -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_json(url: str, value: Any) -> None:
    """Strict JSON (NaN written as null, see jsonable), indented."""
    write_text(url, json.dumps(jsonable(value), indent=1, allow_nan=False))


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[Path]:
    """A local folder holding `url`'s files: itself when local, else a temporary download
    (torch.load wants a local file), removed on exit."""
    local = local_path(url)
    if local is not None:
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="mmdls-") as tmp:
        fs, remote = _fs(url)
        fs.get(remote.rstrip("/") + "/", tmp, recursive=True)
        yield Path(tmp)
