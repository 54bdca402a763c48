"""Durable file operations shared by the cache and the ``--out`` publisher.

- ``make_temp_dir``: a uniquely named folder created with the process umask
  (``tempfile.mkdtemp`` always makes 0700), its name carrying the host and pid
  of its owner so that ``clean_stale`` can remove leftovers of dead processes
  (or of any process once they are older than ``STALE_AGE_S``).
- ``fsync_tree``: fsync every file and folder of a tree before the rename that
  publishes it, so a power loss never leaves a renamed entry with empty files.
- ``copy_file_verified``: copy one file (a reflink where the filesystem has
  one) with the umask's permissions, checking the bytes against a recorded
  sha256 and size while copying.
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


def sha256_file(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


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


def copy_file_verified(src: Path, dst: Path, *, sha256: str | None = None, size: int | None = None) -> None:
    """Copy ``src`` to a new file ``dst`` (umask permissions, fsync'ed): a
    reflink where the filesystem supports one, else an in-kernel copy, else a
    byte copy. With a record, the bytes written are read back and hashed, and
    a mismatch raises ``CopyMismatch``."""
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
    if sha256 is None and size is None:
        return
    digest, n = sha256_file(dst)
    if size is not None and n != size:
        raise CopyMismatch(f"{src}: {n} bytes, the entry recorded {size}")
    if sha256 is not None and digest != sha256:
        raise CopyMismatch(f"{src}: sha256 {digest[:12]}..., the entry recorded {sha256[:12]}...")


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
