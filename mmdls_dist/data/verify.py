"""Shards against their manifest, before anything trains on them.

Three layers, each naming the shard and the fault:

* the manifest itself: split labels, patient counts, unique and valid patient ids, shard
  names, the splits block agreeing with the shard list;
* each shard: present, its size, its sha256, and the patients it holds: the tar's sample
  keys in the manifest's order, and each sample's meta.json naming the same patient
  (a crafted or rewritten shard cannot smuggle in another id, nor a path);
* tars in the folder that the manifest does not list: a warning (a half-copied reshard?).

Hashing reads every byte, so a file once verified is remembered by its fingerprint (size
and modification time, or the object store's ETag) in a small JSON cache
(MMDLS_CACHE_DIR, default ~/.cache/mmdls-dist): a restart, a resumed run or another
trial on the same machine does not read the data again. The cache guards against
corruption and truncation, not against someone who restores a modified file's mtime; the
loader still checks every sample's id as it reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from mmdls_dist import storage
from mmdls_dist.data.schema import valid_patient_id
from mmdls_dist.data.shards import MANIFEST, ShardError

log = logging.getLogger(__name__)

CACHE_FILE = "verified-shards.json"


def manifest_problems(manifest: dict) -> list[str]:
    """The manifest's own consistency: what it lists must add up."""
    problems = []
    entries = manifest["shards"]
    names = Counter(e["name"] for e in entries)
    problems += [f"shard {n!r} is listed {k} times" for n, k in names.items() if k > 1]
    for e in entries:
        if "/" in e["name"] or "\\" in e["name"] or not e["name"].endswith(".tar"):
            problems.append(f"shard name {e['name']!r} is not a plain .tar file name")
        if e["split"] not in manifest["splits"]:
            problems.append(f"{e['name']}: split {e['split']!r} is not a split of the manifest")
        if len(e["keys"]) != e["n_patients"]:
            problems.append(
                f"{e['name']}: {len(e['keys'])} patient ids for n_patients {e['n_patients']}"
            )
        bad = [k for k in e["keys"] if not valid_patient_id(k)]
        if bad:
            problems.append(
                f"{e['name']}: {len(bad)} invalid patient id(s) (not letters/digits/-/_)"
            )
    keys = Counter(k for e in entries for k in e["keys"])
    twice = sorted(k for k, n in keys.items() if n > 1)
    if twice:
        problems.append(f"{len(twice)} patient id(s) in more than one place, e.g. {twice[0]!r}")
    for split, info in manifest["splits"].items():
        listed = [e for e in entries if e["split"] == split]
        if info["shards"] != [e["name"] for e in listed]:
            problems.append(f"splits.{split}.shards disagrees with the shard list")
        if info["n_patients"] != sum(e["n_patients"] for e in listed):
            problems.append(f"splits.{split}.n_patients disagrees with its shards' counts")
    return problems


def unlisted_shards(root: str, manifest: dict) -> list[str]:
    """Tar files in the folder that the manifest does not list."""
    listed = {e["name"] for e in manifest["shards"]}
    return sorted(n for n in storage.list_names(root) if n.endswith(".tar") and n not in listed)


class _Hashing:
    """A read-only stream that hashes what passes through it (one pass for sha256 and
    the tar's contents)."""

    def __init__(self, stream):
        self.stream, self.digest = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        return data


def scan_shard(url: str) -> tuple[str, list[tuple[str, str | None]]]:
    """One pass over a shard -> (sha256, [(sample key, its meta.json patient_id)])."""
    samples: list[tuple[str, str | None]] = []
    with storage.open_file(url) as raw:
        stream = _Hashing(raw)
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                if not member.isreg():
                    continue
                key = member.name.split(".", 1)[0]
                if not samples or samples[-1][0] != key:
                    samples.append((key, None))
                if member.name.endswith(".meta.json"):
                    meta = json.loads(archive.extractfile(member).read())
                    samples[-1] = (key, meta.get("patient_id"))
        while stream.read(1 << 20):
            pass  # the tar's trailing blocks belong to the file's hash too
    return stream.digest.hexdigest(), samples


def content_problem(url: str, entry: dict, samples: list[tuple[str, str | None]]) -> str | None:
    keys = [key for key, _ in samples]
    if keys != entry["keys"]:
        return f"{url}: its samples are not the manifest's patients (rewritten after sharding?)"
    for key, pid in samples:
        if pid != key:
            return f"{url}: sample {key!r} says it is patient {pid!r} in its meta.json"
    return None


def _cache_path() -> Path:
    base = os.environ.get("MMDLS_CACHE_DIR") or Path.home() / ".cache" / "mmdls-dist"
    return Path(base) / CACHE_FILE


class VerifiedCache:
    """Fingerprints of shard files whose sha256 and contents were checked."""

    def __init__(self, path: Path | None = None):
        self.path = path or _cache_path()
        try:
            self.known: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def key(self, url: str, entry: dict) -> str | None:
        mark = storage.fingerprint(url)
        return None if mark is None else f"{url}|{entry['sha256']}|{mark}"

    def __contains__(self, key: str | None) -> bool:
        return key is not None and key in self.known

    def add(self, key: str | None) -> None:
        if key is not None:
            self.known[key] = "ok"
            self.changed = True

    def save(self) -> None:
        """Write the cache (once per check, not once per shard)."""
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
            tmp.write_text(json.dumps(self.known))
            tmp.replace(self.path)
            self.changed = False
        except OSError as exn:  # a read-only home: verify again next time, nothing worse
            log.debug("cannot write the shard cache %s: %s", self.path, exn)


def verify_shard(
    root: str, entry: dict, check_hash: bool = True, cache: VerifiedCache | None = None
) -> str | None:
    """None if the shard matches the manifest, else a message naming the shard and the fault.
    check_hash: also its sha256 and its samples' ids (skipped where `cache` knows the file)."""
    url = storage.join(root, entry["name"])
    size = storage.size(url)
    if size is None:
        return f"{url}: shard is missing"
    if size != entry["bytes"]:
        kind = "truncated" if size < entry["bytes"] else "longer than recorded"
        return f"{url}: shard is {kind} ({size} bytes, manifest says {entry['bytes']})"
    if not check_hash:
        return None
    key = cache.key(url, entry) if cache is not None else None
    if cache is not None and key in cache:
        return None
    try:
        digest, samples = scan_shard(url)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exn:
        return f"{url}: shard is unreadable ({exn})"
    if digest != entry["sha256"]:
        return f"{url}: shard is corrupted (sha256 differs from the manifest)"
    problem = content_problem(url, entry, samples)
    if problem is None and cache is not None:
        cache.add(key)
    return problem


def verify_shards(
    root: str,
    manifest: dict,
    splits: Sequence[str] | None = None,
    check_hash: bool = True,
    cache: VerifiedCache | None = None,
) -> list[str]:
    """Every problem of the manifest and of its shards (of `splits`, or all)."""
    problems = [f"{storage.join(root, MANIFEST)}: {p}" for p in manifest_problems(manifest)]
    for entry in manifest["shards"]:
        if splits is None or entry["split"] in splits:
            problem = verify_shard(root, entry, check_hash, cache)
            if problem:
                problems.append(problem)
    if cache is not None:
        cache.save()
    return problems


def ensure_verified(
    root: str, manifest: dict, splits: Sequence[str] | None = None, check_hash: bool = True
) -> None:
    """verify_shards with the cache of verified files; one ShardError naming every problem."""
    problems = verify_shards(root, manifest, splits, check_hash, VerifiedCache())
    if problems:
        raise ShardError(f"{root}: shards do not match manifest.json:\n  " + "\n  ".join(problems))


def check_dataset(root: str, manifest: dict, check_hash: bool = True) -> None:
    """The driver's check before any worker starts: every shard of every split, and a
    warning for tars the manifest does not list."""
    ensure_verified(root, manifest, None, check_hash)
    extra = unlisted_shards(root, manifest)
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        log.warning("%s: %d tar file(s) not in manifest.json, ignored: %s", root, len(extra), shown)
