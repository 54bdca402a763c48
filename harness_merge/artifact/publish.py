"""Publish an artifact at ``--out``: atomic, replacement included, locked.

``publish(src, out, files=...)`` copies a cache entry (a reflink where the
filesystem has one, else a byte copy, verified against the entry's recorded
sizes and hashes while copying) into ``.<out>.tmp-<host>-<pid>-<rand>`` next
to ``out``, fsyncs it, then puts it in place:

- no ``out`` yet: one ``rename``;
- an existing ``out``: ``renameat2(RENAME_EXCHANGE)`` swaps the two folders in
  one step, so ``out`` always holds a complete artifact, the old or the new;
  where the kernel or filesystem lacks it, the old artifact is renamed to
  ``.<out>.old-*`` and the new one renamed in; a crash between the two leaves
  ``out`` missing, and the next publish to ``out`` renames the old one back.

``publish_built(tmp, out)`` does the same for a folder built in ``out``'s
parent (``--no-cache``), without a copy. ``out``'s files are its own (never
links to the cache) with the umask's permissions. Publishers of one ``out``
are serialised by an ``flock`` on ``out``'s parent folder (no lock file is
left behind); leftovers of dead publishers are removed by the next one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import ArtifactError
from . import fsio
from .cache import FILES_RECORD, MANIFEST


def check_out_dir(out: Path) -> None:
    """An existing ``out`` must be empty or a previous artifact of ours."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ArtifactError(
            f"{out}: exists and is not a harness-merge artifact (no {MANIFEST}); "
            f"choose another output folder or remove it"
        )


@contextlib.contextmanager
def out_lock(out: Path):
    """Exclusive lock for publishing to ``out``: ``flock`` on its parent folder."""
    parent = Path(out).parent
    try:
        import fcntl
    except ImportError:  # not POSIX: a lock file beside out
        from filelock import FileLock

        with FileLock(str(parent / f".{Path(out).name}.hm-lock")):
            yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _prefixes(out: Path) -> tuple[str, str]:
    return f".{out.name}.tmp-", f".{out.name}.old-"


def recover(out: Path) -> None:
    """Under the lock: undo what a killed publisher left. A missing ``out``
    with an ``.old-*`` beside it (killed between the fallback's two renames)
    gets the old artifact back; dead publishers' temp folders are removed."""
    tmp_p, old_p = _prefixes(out)
    parent = out.parent
    if not out.exists():
        olds = sorted(
            (p for p in parent.iterdir() if p.name.startswith(old_p) and (p / MANIFEST).is_file()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        if olds:
            os.rename(olds[0], out)
    # We hold the lock: every other temp/old folder of this out is a leftover.
    for p in list(parent.iterdir()):
        if p.name.startswith((tmp_p, old_p)):
            fsio.rmtree(p)


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the complete, fsync'ed folder ``tmp`` at ``out``; remove the old one."""
    parent = out.parent
    if not out.exists():
        os.rename(tmp, out)
        fsio.fsync_path(parent)
        return
    swapped = fsio.exchange(tmp, out)
    if swapped:
        fsio.fsync_path(parent)
        fsio.fault("publish.swapped")
        fsio.rmtree(tmp)  # now the old artifact
        return
    old = fsio.temp_name(parent, _prefixes(out)[1])
    os.rename(out, old)
    fsio.fault("publish.moved_old")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    fsio.fsync_path(parent)
    fsio.rmtree(old)


def publish(src: Path, out: Path, *, files: dict[str, dict] | None) -> None:
    """Copy ``src`` (a cache entry; ``files`` its record) to ``out`` atomically.

    Raises ``fsio.CopyMismatch`` if the entry's bytes differ from its record
    (then nothing changed at ``out``)."""
    src, out = Path(src), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out_lock(out):
        recover(out)
        check_out_dir(out)
        tmp = fsio.make_temp_dir(out.parent, _prefixes(out)[0])
        try:
            rels = (
                sorted(files)
                if files is not None
                else sorted(
                    p.relative_to(src).as_posix()
                    for p in src.rglob("*")
                    if p.is_file() and p.name != FILES_RECORD
                )
            )
            for rel in rels:
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                want = (files or {}).get(rel, {})
                fsio.copy_file_verified(src / rel, dst, digest=fsio.digest_of(want), size=want.get("size"))
            fsio.fsync_tree(tmp)
            fsio.fault("publish.copied")
            _swap_in(tmp, out)
        except BaseException:
            fsio.rmtree(tmp)
            raise


def publish_built(tmp: Path, out: Path) -> None:
    """Move a finished build folder (in ``out``'s parent) to ``out`` atomically."""
    tmp, out = Path(tmp), Path(out)
    fsio.apply_umask(tmp)
    fsio.fsync_tree(tmp)
    with out_lock(out):
        recover(out)
        check_out_dir(out)
        try:
            _swap_in(tmp, out)
        except BaseException:
            fsio.rmtree(tmp)
            raise
