"""The one temp-file+rename routine (``fsio.atomic_write_*``) and the one
temp-folder+rename routine (``fsio.atomic_dir``) every writer outside the cache
and the ``--out`` publisher uses: all or nothing, fsync'ed when durable,
nothing left behind on an error."""

from __future__ import annotations

import os
import stat

import pytest

from harness_merge.artifact import fsio


@pytest.fixture
def fsyncs(monkeypatch):
    """The paths (files by fd, folders by name) fsync'ed during a test."""
    seen: list = []
    real_fsync, real_path = os.fsync, fsio.fsync_path

    def fsync(fd):
        seen.append(("fd", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def fsync_path(p):
        seen.append(("path", str(p)))
        real_path(p)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(fsio, "fsync_path", fsync_path)
    return seen


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_write_text_replaces_in_one_step_with_umask_permissions(tmp_path, fsyncs):
    p = tmp_path / "a.json"
    p.write_text("old")
    fsio.atomic_write_text(p, "néw\r\n")
    assert p.read_bytes() == "néw\r\n".encode()  # utf-8, no newline translation
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~_umask()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]
    # durable: the temp file's bytes before the rename, the folder after it
    assert fsyncs[0][0] == "fd" and fsyncs[0][1].startswith(str(tmp_path / ".a.json.tmp-"))
    assert ("path", str(tmp_path)) in fsyncs[1:]


def test_not_durable_writes_without_fsync(tmp_path, fsyncs):
    p = tmp_path / "memo"
    fsio.atomic_write_text(p, "x", durable=False)
    assert p.read_text() == "x" and fsyncs == []


def test_backup_keeps_the_previous_version_as_a_link(tmp_path):
    p = tmp_path / "results.json"
    fsio.atomic_write_bytes(p, b"1", backup=True)
    assert not (tmp_path / "results.json.bak").exists()
    fsio.atomic_write_bytes(p, b"2", backup=True)
    assert p.read_bytes() == b"2" and (tmp_path / "results.json.bak").read_bytes() == b"1"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["results.json", "results.json.bak"]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "card.md"
    p.write_text("old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="No space"):
        fsio.atomic_write_text(p, "new")
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["card.md"]


def test_atomic_dir_publishes_on_success_replacing_the_old(tmp_path, fsyncs):
    out = tmp_path / "sub" / "art"
    with fsio.atomic_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".art.tmp-") and not out.exists()
        (tmp / "f").write_text("1")
    assert (out / "f").read_text() == "1"
    assert ("path", str(out.parent)) in fsyncs  # the rename made durable
    with fsio.atomic_dir(out, durable=False) as tmp:
        (tmp / "g").write_text("2")
    assert sorted(x.name for x in out.iterdir()) == ["g"]
    assert sorted(x.name for x in out.parent.iterdir()) == ["art"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()  # not mkdtemp's 0700


def test_atomic_dir_keeps_what_another_process_published(tmp_path):
    out = tmp_path / "compat"
    with fsio.atomic_dir(out, replace=False) as tmp:
        (tmp / "mine").write_text("x")
        out.mkdir()
        (out / "theirs").write_text("y")  # made meanwhile
    assert sorted(x.name for x in tmp_path.iterdir()) == ["compat"]
    assert sorted(x.name for x in out.iterdir()) == ["theirs"]


def test_atomic_dir_on_error_removes_the_temp_and_keeps_out(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "old").write_text("o")
    with pytest.raises(RuntimeError):
        with fsio.atomic_dir(out) as tmp:
            (tmp / "half").write_text("h")
            raise RuntimeError("merge failed")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["art"]
    assert sorted(x.name for x in out.iterdir()) == ["old"]


def test_atomic_dir_cleans_leftovers_of_dead_writers(tmp_path):
    dead = tmp_path / f".art.tmp-{fsio._HOST}-999999999-abcd1234"
    dead.mkdir()
    with fsio.atomic_dir(tmp_path / "art") as tmp:
        (tmp / "f").write_text("1")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["art"]
