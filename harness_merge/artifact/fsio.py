"""Durable file operations shared by the cache and the ``--out`` publisher.

- ``make_temp_dir``: a uniquely named folder created with the process umask
  (``tempfile.mkdtemp`` always makes 0700), its name carrying the host and pid
  of its owner so that ``clean_stale`` can remove leftovers of dead processes
  (or of any process once they are older than ``STALE_AGE_S``).
- ``fsync_tree``: fsync every file and folder of a tree before the rename that
  publishes it, so a power loss never leaves a renamed entry with empty files.
- content hashes (``HASHES``): ``xxh3_128`` by default, ``sha256`` by name
  (``HARNESS_MERGE_HASH`` / ``content_hash=``); ``hash_file`` reads a file
  through a memory map, ``digest_of`` finds the recorded digest in a record
  (the key names the algorithm), ``note_written`` / ``written_digest`` let a
  writer that hashed its bytes on the way out spare the seal a re-read.
- ``copy_file_verified``: copy one file (a reflink where the filesystem has
  one) with the umask's permissions, checking the bytes against a recorded
  digest and size after copying.
- ``exchange``: ``renameat2(RENAME_EXCHANGE)`` on Linux (swap two paths in one
  step); ``None`` where the kernel or filesystem lacks it.
- ``fault(point)``: the test-only seam. ``HARNESS_MERGE_FAULT=<point>[,<point>...]``
  kills the process with SIGKILL at each named write point (``<point>:ENOSPC``,
  ``:EROFS``, ``:EACCES`` raise that OSError instead). Points: ``cache.built``
  (entry written, not yet renamed into place), ``cache.published`` (renamed),
  ``build.written`` (``--no-cache`` build written), ``publish.copied`` (the new
  ``--out`` copy complete, not yet swapped in), ``publish.swapped`` (new
  ``--out`` in place, the old one not yet removed), ``publish.moved_old``
  (fallback without RENAME_EXCHANGE: old ``--out`` moved aside, new not yet in).
- ``atomic_write_bytes`` / ``atomic_write_text``: replace one file in one step
  (a temp file next to it, then ``os.replace``), fsync'ed unless
  ``durable=False``, optionally keeping the previous version as ``<name>.bak``.
- ``atomic_dir``: fill a temp folder next to a destination and rename it into
  place on success (removed on failure); every folder the package publishes
  outside the cache and ``--out`` is written this way.
- ``os_error_text``: an OSError (or safetensors' I/O error) as one line.
"""

from __future__ import annotations

import contextvars
import ctypes
import errno
import hashlib
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STALE_AGE_S = 24 * 3600
LIVE_PID_AGE_S = 7 * 24 * 3600  # a live pid this old is taken to be a reused one
FAULT_ENV = "HARNESS_MERGE_FAULT"
_HOST = socket.gethostname().replace("-", "_")[:32] or "host"
_FICLONE = 0x40049409
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fault(point: str) -> None:
    """Test seam: act at the named write point when ``HARNESS_MERGE_FAULT`` names it."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, err = item.strip().partition(":")
        if name != point:
            continue
        if not err:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        code = getattr(errno, err.upper(), errno.EIO)
        raise OSError(code, os.strerror(code), f"<fault {point}>")


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """``parent/<prefix><host>-<pid>-<random>``, mode from the umask."""
    parent = Path(parent)
    while True:
        p = temp_name(parent, prefix)
        try:
            os.mkdir(p)
            return p
        except FileExistsError:
            continue


def _owner_state(name: str, prefix: str) -> str:
    """``"dead"``, ``"alive"`` or ``"unknown"`` (another machine's, or not a
    ``make_temp_dir`` name) for the process named in a temp folder's name."""
    parts = name[len(prefix) :].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return "unknown"
    if parts[0].rsplit("-", 1)[-1] != _HOST:
        return "unknown"
    pid = int(parts[1])
    if pid == os.getpid():
        return "alive"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        return "alive"
    return "alive"


def clean_stale(parent: Path, prefix: str, *, max_age_s: float = STALE_AGE_S) -> list[Path]:
    """Remove ``parent/<prefix>*`` folders whose owner (on this machine) is
    dead; folders of other machines once older than ``max_age_s``, and of a
    live pid (which may be a reused one) once older than ``LIVE_PID_AGE_S``.
    Returns what was removed; errors are ignored (another cleaner may be at
    work, or the folder is not ours to remove)."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    now = time.time()
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        try:
            age = now - p.lstat().st_mtime
        except OSError:
            continue
        state = _owner_state(p.name, prefix)
        if (
            state == "dead"
            or (state == "unknown" and age > max_age_s)
            or (state == "alive" and age > LIVE_PID_AGE_S)
        ):
            rmtree(p)
            removed.append(p)
    return removed


def rmtree(p: Path) -> None:
    if Path(p).is_dir() and not Path(p).is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            os.unlink(p)
        except OSError:
            pass


def current_umask() -> int:
    """The process umask (read from /proc on Linux: no set-and-restore race)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give every file 0666 and every folder 0777 less the umask: some writers
    (safetensors) create their files 0600 whatever the umask."""
    mask = current_umask()
    for d, _dirs, files in os.walk(root):
        os.chmod(d, 0o777 & ~mask)
        for f in files:
            os.chmod(Path(d) / f, 0o666 & ~mask)


def fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every folder (deepest first), then ``root``."""
    root = Path(root)
    dirs = []
    for d, _, files in os.walk(root):
        dirs.append(Path(d))
        for f in files:
            fsync_path(Path(d) / f)
    for d in reversed(dirs):
        fsync_path(d)


# -- content hashes -------------------------------------------------------------
# xxh3-128 (xxhash) runs at ~13 GB/s on one core here, sha256 (OpenSSL, SHA-NI) at
# ~1.7 GB/s: on a warm page cache sha256 of the inputs alone costs twice the time
# to read them. Both detect damage; sha256 is the one to name where a digest must
# also resist a deliberate collision.
HASHES = ("xxh3_128", "sha256")
DEFAULT_HASH = "xxh3_128"
HASH_ENV = "HARNESS_MERGE_HASH"
_HEX_LEN = {"xxh3_128": 32, "sha256": 64}


def content_hash_name(name: str | None = None) -> str:
    """The content hash to use: ``name``, else ``HARNESS_MERGE_HASH``, else
    ``xxh3_128``; anything else is a ValueError naming where it came from."""
    where = "content_hash"
    if name is None:
        name, where = os.environ.get(HASH_ENV) or DEFAULT_HASH, HASH_ENV
    if name not in HASHES:
        raise ValueError(f"{where}={name!r}: the content hash must be one of {', '.join(HASHES)}")
    return name


def new_hash(name: str):
    """A fresh hash object (``update`` / ``hexdigest``) of algorithm ``name``."""
    if name == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    if name == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown content hash {name!r} (one of {', '.join(HASHES)})")


def is_digest(name: str, text: str) -> bool:
    return len(text) == _HEX_LEN.get(name, -1) and all(c in "0123456789abcdef" for c in text)


def hash_file(path: Path, name: str) -> tuple[str, int]:
    """``(hex digest, size)`` of a file's bytes, hashed through a read-only
    memory map (no copy into Python buffers; the hashes release the GIL)."""
    import mmap

    h = new_hash(name)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
                n = len(m)
        else:
            n = 0
    if n != size:  # pragma: no cover - the file changed while mapped
        raise OSError(errno.EIO, f"{path}: size changed while hashing")
    return h.hexdigest(), n


def digest_of(record: dict | None) -> tuple[str, str] | None:
    """``(algorithm, hex)`` of a record that names its digest by algorithm
    (``{"sha256": ...}`` or ``{"xxh3_128": ...}``), or None."""
    for name in HASHES:
        value = (record or {}).get(name)
        if isinstance(value, str):
            return name, value
    return None


# Digests computed while writing, by (path, size, mtime_ns, inode, device) at close:
# the seal takes them instead of reading the file back (the bytes hashed are the
# bytes handed to write()). A file changed after its close has another stat.
_WRITTEN: dict[str, tuple[tuple[int, int, int, int], str, str]] = {}


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def note_written(path: Path, name: str, digest: str) -> None:
    """Remember ``digest`` (algorithm ``name``) for ``path`` as it is now."""
    _WRITTEN[os.path.abspath(path)] = (_stamp(os.stat(path)), name, digest)


def written_digest(path: Path, name: str) -> str | None:
    """The digest noted for ``path`` when its stat is still the one noted (then forgotten)."""
    noted = _WRITTEN.pop(os.path.abspath(path), None)
    if noted is None or noted[1] != name:
        return None
    try:
        return noted[2] if _stamp(os.stat(path)) == noted[0] else None
    except OSError:
        return None


_WRITE_HASH: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "harness_merge_write_hash", default=None
)


@contextmanager
def hash_on_write(name: str | None) -> Iterator[None]:
    """Within this block, ``HashingWriter`` files hash their bytes with ``name``
    (the cache's algorithm, around a build it will seal); None: no hashing."""
    token = _WRITE_HASH.set(name)
    try:
        yield
    finally:
        _WRITE_HASH.reset(token)


class HashingWriter:
    """A file opened for writing that hashes the bytes written (with the
    algorithm of the enclosing ``hash_on_write``, if any) and, every
    ``SYNC_EVERY`` bytes, starts the kernel's writeback of what it holds on a
    background thread (``fdatasync``), so the fsync before publishing finds
    little left to flush. An error of that writeback (EIO, ENOSPC of delayed
    allocation) is raised by the next ``write`` or by ``close`` (a later fsync
    on another descriptor may not see an error this one already reported).
    ``close()`` notes the digest (``note_written``)."""

    SYNC_EVERY = 64 << 20

    def __init__(self, path: Path):
        self.path, self.name = Path(path), _WRITE_HASH.get()
        self._h = new_hash(self.name) if self.name is not None else None
        self._f = open(self.path, "wb")  # noqa: SIM115 (closed by close/abort)
        self._since_sync = 0
        self._sync = None  # the background writeback of the previous SYNC_EVERY bytes
        self._sync_error: OSError | None = None

    def write(self, data) -> None:
        if self._sync_error is not None:
            self._raise_sync_error()
        if self._h is not None:
            self._h.update(data)
        self._f.write(data)
        self._since_sync += memoryview(data).nbytes
        if self._since_sync >= self.SYNC_EVERY and (self._sync is None or not self._sync.is_alive()):
            import threading

            self._f.flush()
            self._sync = threading.Thread(target=self._datasync, args=(self._f.fileno(),), daemon=True)
            self._sync.start()
            self._since_sync = 0

    def _datasync(self, fd: int) -> None:
        try:
            getattr(os, "fdatasync", os.fsync)(fd)  # macOS has no fdatasync
        except OSError as e:
            self._sync_error = e

    def _raise_sync_error(self):
        e, self._sync_error = self._sync_error, None
        raise OSError(e.errno, f"{self.path}: writing back: {e.strerror}") from e

    def _join(self) -> None:
        if self._sync is not None:
            self._sync.join()
            self._sync = None

    def abort(self) -> None:
        self._join()
        self._sync_error = None
        self._f.close()

    def close(self) -> None:
        self._join()
        if self._sync_error is not None:
            self._f.close()
            self._raise_sync_error()
        self._f.close()
        if self._h is not None:
            note_written(self.path, self.name, self._h.hexdigest())


class CopyMismatch(Exception):
    """The source's bytes do not match their record (size or sha256)."""


def _kernel_copy(fi, fo) -> bool:
    """Copy with ``copy_file_range`` (in-kernel, no Python buffers); False where
    it is not available for these files (then nothing was written)."""
    if not hasattr(os, "copy_file_range"):
        return False
    n, off = os.fstat(fi.fileno()).st_size, 0
    try:
        while off < n:
            k = os.copy_file_range(fi.fileno(), fo.fileno(), n - off)
            if k == 0:
                break
            off += k
    except OSError as e:
        if off == 0 and e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            return False
        raise
    return True


def copy_file_verified(
    src: Path, dst: Path, *, digest: tuple[str, str] | None = None, size: int | None = None
) -> None:
    """Copy ``src`` to a new file ``dst`` (umask permissions, fsync'ed): a
    reflink where the filesystem supports one, else an in-kernel copy, else a
    byte copy. With a record (``digest`` = ``(algorithm, hex)``, ``size``), the
    bytes written are read back and hashed, and a mismatch raises ``CopyMismatch``."""
    with open(src, "rb") as fi:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fo:
            done = False
            if sys.platform.startswith("linux"):
                try:
                    import fcntl

                    fcntl.ioctl(fo.fileno(), _FICLONE, fi.fileno())
                    done = True
                except OSError:
                    done = False
            if not done:
                done = _kernel_copy(fi, fo)
            if not done:
                shutil.copyfileobj(fi, fo, 1 << 22)
            fo.flush()
            os.fsync(fo.fileno())
    if digest is None and size is None:
        return
    algo = digest[0] if digest is not None else DEFAULT_HASH
    got, n = hash_file(dst, algo)
    if size is not None and n != size:
        raise CopyMismatch(f"{src}: {n} bytes, the entry recorded {size}")
    if digest is not None and got != digest[1]:
        raise CopyMismatch(f"{src}: {algo} {got[:12]}..., the entry recorded {digest[1][:12]}...")


def temp_name(parent: Path, prefix: str) -> Path:
    """A fresh ``make_temp_dir``-style name (not created)."""
    return Path(parent) / f"{prefix}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _discard(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True, backup: bool = False) -> Path:
    """Replace ``path`` with ``data`` in one step: readers see the old file or the
    new one, never a part. The bytes go to ``.<name>.tmp-<host>-<pid>-<rand>``
    in the same folder (umask permissions), then ``os.replace``. ``durable``:
    the file is fsync'ed before the rename and the folder after it (best
    effort: a folder that cannot be fsync'ed is not an error). ``backup``: the
    previous version stays as ``<name>.bak`` (a second link to it, no copy;
    skipped where the filesystem has no hard links). On an error the temp
    file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temp_name(path.parent, f".{path.name}.tmp-")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if backup and path.is_file():
            bak = path.with_name(path.name + ".bak")
            bak_tmp = temp_name(path.parent, f".{bak.name}.tmp-")
            try:
                os.link(path, bak_tmp)
                os.replace(bak_tmp, bak)
            except OSError:  # no hard links here: no backup, the write itself stays atomic
                _discard(bak_tmp)
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    if durable:
        try:
            fsync_path(path.parent)
        except OSError:
            pass
    return path


def atomic_write_text(path: Path, text: str, *, durable: bool = True, backup: bool = False) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8 (written as is: no newline translation)."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable, backup=backup)


@contextmanager
def atomic_dir(out: Path, *, replace: bool = True, durable: bool = True) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp:`` fill ``tmp`` (``.<name>.tmp-<host>-<pid>-<rand>``
    next to ``out``, umask permissions; leftovers of dead processes are removed
    first, see :func:`clean_stale`); when the block returns, ``tmp`` is
    fsync'ed (``durable``) and renamed to ``out``. An existing ``out`` is
    removed first with ``replace`` (a reader may then find no ``out`` for a
    moment), else kept and the new folder dropped (another process made it
    first: same inputs, same folder). On an exception ``tmp`` is removed and
    ``out`` untouched."""
    out = Path(out)
    prefix = f".{out.name}.tmp-"
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent, prefix)
    tmp = make_temp_dir(out.parent, prefix)
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        if replace and (out.exists() or out.is_symlink()):
            rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            if replace or not out.is_dir():
                raise
            rmtree(tmp)  # made meanwhile by another process
        if durable:
            fsync_path(out.parent)
    except BaseException:
        rmtree(tmp)
        raise


def exchange(a: Path, b: Path) -> bool | None:
    """Swap ``a`` and ``b`` atomically; ``None`` when RENAME_EXCHANGE is not
    available here (no Linux, old kernel, unsupporting filesystem)."""
    if not sys.platform.startswith("linux") or os.environ.get("HARNESS_MERGE_NO_EXCHANGE"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)):
        return None
    raise OSError(e, os.strerror(e), str(a), None, str(b))


def os_error_text(e: BaseException) -> str:
    """One line for an OSError or a safetensors I/O error (which is not an OSError)."""
    if isinstance(e, OSError):
        where = e.filename or ""
        if e.filename2:
            where = f"{where} -> {e.filename2}"
        msg = e.strerror or str(e)
        return f"{where}: {msg}" if where else msg
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    import re

    m = re.search(r"(?:code: |os error )(\d+)", text)
    if m:
        return os.strerror(int(m.group(1)))
    return text


def io_errno(e: BaseException) -> int | None:
    """The errno of an OSError or of a safetensors I/O error message."""
    if isinstance(e, OSError):
        return e.errno
    import re

    m = re.search(r"(?:code: |os error )(\d+)", str(e))
    return int(m.group(1)) if m else None
