"""Content-addressed merge cache.

Key = sha256 of (code version, method, params, the input files' sha256, the
base's sha256 when the output contains base weights, format, rank, dtype).
An entry is a folder ``<root>/merges/<key>/`` that appears only by an atomic
rename of a finished temp folder, under a file lock: a crash or a concurrent
merge never leaves a half-written entry, and a second merge of the same key
waits for the first and reuses it. File hashes are memoised by (path, size,
mtime, inode), so a repeat run does not re-read the inputs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from filelock import FileLock

MANIFEST = "harness_merge.json"


def default_cache_dir() -> Path:
    env = os.environ.get("HARNESS_MERGE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "harness_merge"


def code_version() -> str:
    """Package version + hash of the source files that shape a merge result, so
    a changed formula never serves a stale cache entry."""
    from .. import __version__

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(__version__.encode())
    for sub in ("methods", "inputs", "artifact", "merge_loop.py", "types.py"):
        p = root / sub
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


class FileHasher:
    """sha256 of files, memoised on disk by (realpath, size, mtime_ns, inode)."""

    def __init__(self, memo_dir: Path | None):
        self.memo_dir = memo_dir
        if memo_dir is not None:
            memo_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, path: Path) -> str:
        st = os.stat(path)
        ident = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        memo = None
        if self.memo_dir is not None:
            memo = self.memo_dir / hashlib.sha1(ident.encode()).hexdigest()
            if memo.is_file():
                return memo.read_text().strip()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        digest = h.hexdigest()
        if memo is not None:
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(digest)
            os.replace(tmp, memo)
        return digest

    def many(self, paths) -> str:
        """One digest for an ordered set of files (names + contents)."""
        h = hashlib.sha256()
        for p in paths:
            h.update(Path(p).name.encode())
            h.update(self(Path(p)).encode())
        return h.hexdigest()


def cache_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


class MergeCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.merges = self.root / "merges"
        self.merges.mkdir(parents=True, exist_ok=True)
        (self.root / "locks").mkdir(exist_ok=True)
        self.hasher = FileHasher(self.root / "file_hashes")

    def entry(self, key: str) -> Path:
        return self.merges / key

    def lookup(self, key: str) -> Path | None:
        e = self.entry(key)
        return e if (e / MANIFEST).is_file() else None

    def get_or_build(self, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
        """``(entry folder, hit)``; ``build(tmp)`` fills a temp folder, which is
        renamed into place only when it returned (its manifest written last)."""
        hit = self.lookup(key)
        if hit is not None:
            return hit, True
        with FileLock(str(self.root / "locks" / f"{key}.lock")):
            hit = self.lookup(key)
            if hit is not None:
                return hit, True
            final = self.entry(key)
            # Leftovers of a killed merge of this key: dead, since we hold its lock.
            for stale in self.merges.glob(f".tmp-{key[:16]}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # no manifest: not a finished entry
                shutil.rmtree(final)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=self.merges))
            try:
                build(tmp)
                if not (tmp / MANIFEST).is_file():
                    raise RuntimeError("merge build wrote no manifest")
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return final, False
