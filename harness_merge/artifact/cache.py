"""Content-addressed merge cache.

Key = sha256 of (code version, method, params, the input files' digests, the
base's digest when the output contains base weights, format, rank, dtype),
the record of :class:`.provenance.Provenance`. File digests use the content
hash of ``fsio.HASHES``: ``xxh3_128`` by default, ``sha256`` by name
(``HARNESS_MERGE_HASH``, ``content_hash=``); every record names its algorithm.
An entry is a folder ``<root>/merges/<key>/`` that appears only by an atomic
rename of a finished, fsync'ed temp folder, under a file lock: a crash or a
concurrent merge never leaves a half-written entry, and a second merge of the
same key waits for the first and reuses it.

Each entry records the size and digest of every file it holds
(``FILES_RECORD``; weights are hashed as they are written, the rest when
sealed); its files are made read-only. A hit is served only after the sizes
match and the digests do (the check is remembered per file by (size, mtime,
ctime, inode), so an untouched entry is not re-read on every hit; any write
or chmod changes ctime). A damaged entry is reported, moved aside to
``<root>/damaged/`` and rebuilt. Temp folders of dead merges (any key) are
removed by the next miss. File digests of the inputs are memoised by (path,
size, mtime, ctime, inode, algorithm), so a repeat run does not re-read the inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Callable

from filelock import FileLock

from ..errors import ArtifactError
from . import fsio

MANIFEST = "harness_merge.json"
FILES_RECORD = ".harness_merge.files.json"  # the cache's own record; not copied to --out
log = logging.getLogger("harness_merge")


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
    for sub in ("methods", "inputs", "artifact", "merge_loop.py", "types.py", "dtypes.py"):
        p = root / sub
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


class FileHasher:
    """Digests of files (algorithm ``content_hash``, see ``fsio.HASHES``),
    memoised on disk by (realpath, size, mtime_ns, ctime_ns, inode, algorithm):
    an in-place edit that restores the mtime still changes the ctime."""

    def __init__(self, memo_dir: Path | None, content_hash: str | None = None):
        self.algo = fsio.content_hash_name(content_hash)
        self.memo_dir = memo_dir
        if memo_dir is not None:
            try:
                memo_dir.mkdir(parents=True, exist_ok=True)
            except OSError:
                if not memo_dir.is_dir():
                    self.memo_dir = None

    def __call__(self, path: Path) -> str:
        st = os.stat(path)
        ident = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
        if self.algo != "sha256":  # sha256 memos keep the names they had before the choice existed
            ident += f"|{self.algo}"
        memo = None
        if self.memo_dir is not None:
            memo = self.memo_dir / hashlib.sha1(ident.encode()).hexdigest()
            try:
                text = memo.read_text().strip()
            except OSError:
                text = ""
            if fsio.is_digest(self.algo, text):
                return text  # a torn or empty memo is recomputed, never trusted
        digest, _ = fsio.hash_file(path, self.algo)
        if memo is not None:
            try:  # best effort: a read-only cache still serves hits
                fsio.atomic_write_text(memo, digest, durable=False)
            except OSError:
                pass
        return digest

    def many(self, paths) -> str:
        """One digest for an ordered set of files: the hash of each file's name
        followed by its digest (hex), in order."""
        h = fsio.new_hash(self.algo)
        for p in paths:
            h.update(Path(p).name.encode())
            h.update(self(Path(p)).encode())
        return h.hexdigest()


def cache_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def record_files(folder: Path, content_hash: str = fsio.DEFAULT_HASH) -> dict[str, dict]:
    """``{relative path: {"size", <content_hash>: digest}}`` of every file under
    ``folder`` (the record itself excluded), in sorted order. A file whose
    writer hashed it on the way out (``fsio.note_written``) and that is
    unchanged since is not read again."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != FILES_RECORD:
            digest = fsio.written_digest(p, content_hash)
            if digest is not None:
                size = p.stat().st_size
            else:
                digest, size = fsio.hash_file(p, content_hash)
            out[p.relative_to(folder).as_posix()] = {"size": size, content_hash: digest}
    return out


def read_files_record(entry: Path) -> dict[str, dict] | None:
    try:
        rec = json.loads((Path(entry) / FILES_RECORD).read_text())
        return rec["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class MergeCache:
    """The cache under ``root`` (default ``default_cache_dir()``); new entries
    and input digests use ``content_hash`` (default: ``HARNESS_MERGE_HASH`` or
    ``xxh3_128``); an entry is verified with the algorithm its record names."""

    def __init__(self, root: Path | None = None, content_hash: str | None = None):
        from_env = root is None and bool(os.environ.get("HARNESS_MERGE_CACHE"))
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.merges = self.root / "merges"
        self.damaged = self.root / "damaged"
        self.locks = self.root / "locks"
        where = f"{self.root}" + (" (HARNESS_MERGE_CACHE)" if from_env else "")
        if self.root.exists() and not self.root.is_dir():
            raise ArtifactError(
                f"merge cache {where}: is not a folder; point HARNESS_MERGE_CACHE / --cache-dir at a "
                f"folder, or pass --no-cache"
            )
        try:
            self.merges.mkdir(parents=True, exist_ok=True)
            self.locks.mkdir(exist_ok=True)
        except OSError as e:
            if not (self.merges.is_dir() and self.locks.is_dir()):
                raise ArtifactError(
                    f"merge cache {where}: cannot create it ({fsio.os_error_text(e)}); point "
                    f"HARNESS_MERGE_CACHE / --cache-dir at a writable folder, or pass --no-cache"
                ) from None
        self.hasher = FileHasher(self.root / "file_hashes", content_hash)
        self.content_hash = self.hasher.algo

    def entry(self, key: str) -> Path:
        return self.merges / key

    # -- verification ---------------------------------------------------------
    def _memo(self, key: str) -> Path:
        return self.root / "verified" / key

    @staticmethod
    def _stamp(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]

    def check(self, key: str) -> tuple[str, str | None]:
        """``("ok", None)``, ``("absent", None)`` or ``("damaged", why)``.

        Sizes always; the recorded digest unless the file's stat equals that of
        its last successful check."""
        e = self.entry(key)
        if not e.exists():
            return "absent", None
        files = read_files_record(e)
        if files is None:
            return "damaged", f"no readable {FILES_RECORD}"
        if MANIFEST not in files:
            return "damaged", f"{MANIFEST} not recorded"
        present = {
            p.relative_to(e).as_posix() for p in e.rglob("*") if p.is_file() and p.name != FILES_RECORD
        }
        extra = sorted(present - set(files))
        if extra:
            return "damaged", f"unrecorded file {extra[0]}"
        for rel, want in files.items():
            if not isinstance(want, dict) or fsio.digest_of(want) is None:
                return "damaged", f"{rel}: no digest recorded"
        stamps = {}
        for rel, want in files.items():
            try:
                st = os.stat(e / rel)
            except OSError:
                return "damaged", f"{rel} is missing"
            if st.st_size != want["size"]:
                return "damaged", f"{rel} has {st.st_size} bytes, recorded {want['size']}"
            stamps[rel] = self._stamp(st)
        try:
            memo = json.loads(self._memo(key).read_text())
        except (OSError, ValueError):
            memo = {}
        for rel, want in files.items():
            if memo.get(rel) == stamps[rel]:
                continue
            algo, recorded = fsio.digest_of(want)
            try:
                digest, _ = fsio.hash_file(e / rel, algo)
            except OSError as err:
                return "damaged", f"{rel} unreadable ({fsio.os_error_text(err)})"
            if digest != recorded:
                return (
                    "damaged",
                    f"{rel} {algo} {digest[:12]}... differs from the recorded {recorded[:12]}...",
                )
        if memo != stamps:
            self._write_memo(key, stamps)
        return "ok", None

    def _write_memo(self, key: str, stamps: dict) -> None:
        try:
            self._memo(key).parent.mkdir(exist_ok=True)
            fsio.atomic_write_text(self._memo(key), json.dumps(stamps), durable=False)
        except OSError:
            pass  # read-only cache: verified anyway, just not remembered

    def _remember(self, key: str, files: dict[str, dict]) -> None:
        e = self.entry(key)
        try:
            self._write_memo(key, {rel: self._stamp(os.stat(e / rel)) for rel in files})
        except OSError:
            pass

    def lookup(self, key: str) -> Path | None:
        """The entry, when it exists and verifies (a damaged one is not served)."""
        state, _ = self.check(key)
        return self.entry(key) if state == "ok" else None

    def move_aside(self, key: str, why: str) -> None:
        self.damaged.mkdir(exist_ok=True)
        dest = self.damaged / f"{key}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        os.rename(self.entry(key), dest)
        try:
            os.unlink(self._memo(key))
        except OSError:
            pass
        log.warning("cache entry %s is damaged (%s): moved aside to %s; rebuilding it", key[:16], why, dest)

    # -- building -------------------------------------------------------------
    def seal(self, folder: Path) -> dict[str, dict]:
        """Record sizes and digests, make the files read-only (else umask
        permissions), fsync the tree."""
        fsio.apply_umask(folder)
        files = record_files(folder, self.content_hash)
        (Path(folder) / FILES_RECORD).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
        for p in Path(folder).rglob("*"):
            if p.is_file():
                mode = stat.S_IMODE(p.stat().st_mode)
                os.chmod(p, mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        fsio.fsync_tree(folder)
        return files

    def _writable_error(self, e: OSError) -> ArtifactError:
        return ArtifactError(
            f"merge cache {self.root}: cannot write a new entry ({fsio.os_error_text(e)}); the cache "
            f"must be writable on a miss: pass --cache-dir DIR (cache_dir=DIR) or --no-cache"
        )

    def get_or_build(self, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
        """``(entry folder, hit)``; ``build(tmp)`` fills a temp folder, which is
        sealed and renamed into place only when it returned (its manifest
        written last). A damaged entry is moved aside and rebuilt."""
        if self.check(key)[0] == "ok":
            return self.entry(key), True
        try:
            lock = FileLock(str(self.locks / f"{key}.lock"))
            lock.acquire()
        except OSError as e:
            raise self._writable_error(e) from None
        try:
            state, why = self.check(key)
            if state == "ok":
                return self.entry(key), True
            if state == "damaged":
                self.move_aside(key, why)
            # Leftovers of killed merges (any key): their owner is dead or they are old.
            fsio.clean_stale(self.merges, ".tmp-")
            final = self.entry(key)
            try:
                tmp = fsio.make_temp_dir(self.merges, f".tmp-{key[:16]}-")
            except OSError as e:
                raise self._writable_error(e) from None
            try:
                with fsio.hash_on_write(self.content_hash):
                    build(tmp)
                if not (tmp / MANIFEST).is_file():
                    raise RuntimeError("merge build wrote no manifest")
                files = self.seal(tmp)
                fsio.fault("cache.built")
                os.rename(tmp, final)
                fsio.fsync_path(self.merges)
                fsio.fault("cache.published")
                self._remember(key, files)  # just hashed while sealing: the first hit need not re-read
            except BaseException:
                fsio.rmtree(tmp)
                raise
        finally:
            lock.release()
        return final, False
