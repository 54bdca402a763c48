"""The cache and ``--out`` never serve or leave damaged data.

Damage to a cache entry (truncation, flipped bytes, deleted or edited files),
``--out`` as its own copy, kills at the named write points
(``HARNESS_MERGE_FAULT``), concurrent publishers, read-only and full
filesystems (small tmpfs mounts, when we may mount), one-line OS errors,
byte-identical artifacts and umask permissions.

Kills run the merge in a forked child (the parent has torch loaded already, so
a child costs no import); the child dies by SIGKILL at the write point.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import pytest
import xxhash

from harness_merge.api import MergeSpec, merge
from harness_merge.artifact import fsio
from harness_merge.artifact.cache import FILES_RECORD, MANIFEST, MergeCache
from harness_merge.artifact.publish import recover
from harness_merge.harness.cli import main as cli_main


def spec(adapters, method="ta", **params):
    return MergeSpec(
        adapters=tuple(map(str, adapters)), method=method, params={k: str(v) for k, v in params.items()}
    )


def artifact_bytes(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; the manifest without its timing field (and no cache
    record, which hashes the manifest, timing included)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name != FILES_RECORD:
            data = p.read_bytes()
            if p.name == MANIFEST:
                m = json.loads(data)
                m.pop("merge_seconds")
                data = json.dumps(m, sort_keys=True).encode()
            out[p.relative_to(folder).as_posix()] = data
    return out


def the_entry(cache_dir: Path) -> Path:
    entries = [p for p in (cache_dir / "merges").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1, entries
    return entries[0]


def in_child(fn, env: dict | None = None, timeout: float = 180) -> tuple[str, int]:
    """Run ``fn`` in a forked child; ``("killed", signal)`` or ``("exit", code)``."""
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.environ.update(env or {})
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("child merge did not finish")
        time.sleep(0.05)
    if os.WIFSIGNALED(status):
        return "killed", os.WTERMSIG(status)
    return "exit", os.WEXITSTATUS(status)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- cache entries


def test_entry_records_every_file_and_its_files_are_read_only(adapters, cache_dir):
    merge(spec(adapters), cache_dir=cache_dir, progress=False)
    entry = the_entry(cache_dir)
    rec = json.loads((entry / FILES_RECORD).read_text())["files"]
    files = sorted(p.name for p in entry.iterdir() if p.name != FILES_RECORD)
    assert sorted(rec) == files and MANIFEST in rec and "adapter_model.safetensors" in rec
    for name, r in rec.items():
        data = (entry / name).read_bytes()
        # the default content hash, computed here by xxhash itself
        assert r == {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
        assert stat.S_IMODE((entry / name).stat().st_mode) & 0o222 == 0, name


def test_untouched_entry_is_not_rehashed_on_a_hit(adapters, cache_dir, monkeypatch):
    merge(spec(adapters), cache_dir=cache_dir, progress=False)
    entry = the_entry(cache_dir)
    hashed = []
    real = fsio.hash_file
    monkeypatch.setattr(fsio, "hash_file", lambda p, algo: hashed.append(Path(p)) or real(p, algo))
    assert merge(spec(adapters), cache_dir=cache_dir, progress=False).cache_hit
    assert hashed == []  # stat unchanged since sealing: sizes checked, no re-read
    os.utime(entry / "adapter_model.safetensors")  # any change of stat: hashed again
    assert merge(spec(adapters), cache_dir=cache_dir, progress=False).cache_hit
    assert [p.name for p in hashed] == ["adapter_model.safetensors"]


def _truncate(p: Path):
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


def _flip(p: Path, keep_mtime=False):
    st = p.stat()
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.seek(st.st_size // 2)
        chunk = f.read(64)
        f.seek(st.st_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    os.chmod(p, stat.S_IMODE(st.st_mode))
    if keep_mtime:
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def _edit_config(p: Path):
    os.chmod(p.parent / "adapter_config.json", 0o644)
    cfg = json.loads((p.parent / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 999
    (p.parent / "adapter_config.json").write_text(json.dumps(cfg))


DAMAGE = {
    "truncated": _truncate,
    "flipped": _flip,
    "flipped_same_mtime": lambda p: _flip(p, keep_mtime=True),
    "deleted": os.unlink,
    "config_edited": _edit_config,
    "record_deleted": lambda p: os.unlink(p.parent / FILES_RECORD),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_reported_moved_aside_and_rebuilt(damage, adapters, tmp_path, caplog):
    cache = tmp_path / "cache"
    merge(spec(adapters), cache_dir=cache, out=tmp_path / "first", progress=False)
    entry = the_entry(cache)
    merge(spec(adapters), cache_dir=cache, progress=False)  # a verified hit (remembers the check)
    DAMAGE[damage](entry / "adapter_model.safetensors")
    with caplog.at_level(logging.WARNING, logger="harness_merge"):
        art = merge(spec(adapters), cache_dir=cache, out=tmp_path / "out", progress=False)
    assert not art.cache_hit
    assert any("is damaged" in r.getMessage() and "moved aside" in r.getMessage() for r in caplog.records)
    assert len(list((cache / "damaged").iterdir())) == 1
    # Oracle: the same merge in a fresh cache.
    fresh = merge(spec(adapters), cache_dir=tmp_path / "fresh", out=tmp_path / "oracle", progress=False)
    assert artifact_bytes(tmp_path / "out") == artifact_bytes(fresh.path)
    assert artifact_bytes(the_entry(cache)) == artifact_bytes(the_entry(tmp_path / "fresh"))
    # The earlier --out was a copy: the damage did not reach it.
    assert artifact_bytes(tmp_path / "first") == artifact_bytes(fresh.path)


def test_entry_damaged_between_check_and_copy_is_not_published(adapters, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    merge(spec(adapters), cache_dir=cache, progress=False)
    entry = the_entry(cache)
    real = MergeCache.check

    def check_then_damage(self, key):
        res = real(self, key)
        if res[0] == "ok" and not getattr(check_then_damage, "done", False):
            check_then_damage.done = True
            _flip(entry / "adapter_model.safetensors", keep_mtime=True)
        return res

    monkeypatch.setattr(MergeCache, "check", check_then_damage)
    art = merge(spec(adapters), cache_dir=cache, out=tmp_path / "out", progress=False)
    assert not art.cache_hit
    fresh = merge(spec(adapters), cache_dir=tmp_path / "fresh", progress=False)
    assert artifact_bytes(tmp_path / "out") == artifact_bytes(fresh.path)


# ---------------------------------------------------------------- --out


def test_out_is_its_own_copy_with_umask_permissions(adapters, tmp_path):
    cache = tmp_path / "cache"
    old = os.umask(0o027)
    try:
        merge(spec(adapters), cache_dir=cache, out=tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    out, entry = tmp_path / "out", the_entry(cache)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    for p in out.iterdir():
        assert p.stat().st_nlink == 1 and p.stat().st_ino != (entry / p.name).stat().st_ino
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
    assert stat.S_IMODE(entry.stat().st_mode) == 0o750  # entry folders follow the umask too
    # Editing --out in place leaves the cache entry, and later hits, alone.
    (out / "adapter_config.json").write_text("{}")
    again = merge(spec(adapters), cache_dir=cache, out=tmp_path / "again", progress=False)
    assert again.cache_hit
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["target_modules"]
    assert (entry / "adapter_config.json").read_bytes() == (
        tmp_path / "again" / "adapter_config.json"
    ).read_bytes()


def test_no_cache_out_follows_umask(adapters, tmp_path):
    old = os.umask(0o022)
    try:
        merge(spec(adapters), use_cache=False, out=tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()} == {0o644}


def _method_of(out: Path) -> str:
    return json.loads((out / MANIFEST).read_text())["method"]


def _complete(out: Path, cache: Path) -> bool:
    """``out`` equals the cache entry whose manifest it carries, file for file."""
    for entry in (cache / "merges").iterdir():
        if entry.name.startswith("."):
            continue
        if (entry / MANIFEST).read_bytes() == (out / MANIFEST).read_bytes():
            rec = json.loads((entry / FILES_RECORD).read_text())["files"]
            got = {p.name: xxhash.xxh3_128(p.read_bytes()).hexdigest() for p in out.iterdir()}
            return got == {k: v["xxh3_128"] for k, v in rec.items()}
    return False


@pytest.mark.parametrize(
    "point,no_exchange,expect",
    [
        ("publish.copied", False, "ta"),  # killed before the swap: the old artifact is intact
        ("publish.swapped", False, "wa"),  # killed after the swap: the new one is complete
        ("publish.moved_old", True, None),  # fallback without RENAME_EXCHANGE: gap, recovered next run
    ],
)
def test_replacing_out_is_crash_safe(point, no_exchange, expect, adapters, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    merge(spec(adapters, "ta"), cache_dir=cache, out=out, progress=False)
    merge(spec(adapters, "wa"), cache_dir=cache, progress=False)  # only the publish is left to do
    env = {fsio.FAULT_ENV: point, **({"HARNESS_MERGE_NO_EXCHANGE": "1"} if no_exchange else {})}
    kind, sig = in_child(lambda: merge(spec(adapters, "wa"), cache_dir=cache, out=out, progress=False), env)
    assert (kind, sig) == ("killed", signal.SIGKILL)
    assert leftovers(tmp_path)  # the dead publisher's temp folder
    if expect is None:
        assert not out.exists() and any(n.startswith(".out.old-") for n in leftovers(tmp_path))
        recover(out)  # what the next publisher does first, under the lock
        expect = "ta"
    assert _method_of(out) == expect and _complete(out, cache)
    merge(spec(adapters, "wa"), cache_dir=cache, out=out, progress=False)
    assert _method_of(out) == "wa" and _complete(out, cache)
    assert leftovers(tmp_path) == []


def test_killed_before_cache_rename_leaves_no_entry_and_next_miss_cleans(adapters, tmp_path):
    cache = tmp_path / "cache"
    kind, _ = in_child(
        lambda: merge(spec(adapters, "ta"), cache_dir=cache, progress=False), {fsio.FAULT_ENV: "cache.built"}
    )
    assert kind == "killed"
    names = [p.name for p in (cache / "merges").iterdir()]
    assert len(names) == 1 and names[0].startswith(".tmp-")
    # A miss of another key removes the dead merge's folder (its owner is gone).
    merge(spec(adapters, "wa"), cache_dir=cache, progress=False)
    assert [p.name for p in (cache / "merges").iterdir() if p.name.startswith(".")] == []


def test_killed_no_cache_merge_leftover_is_cleaned_by_next_run(adapters, tmp_path):
    out = tmp_path / "out"
    kind, _ = in_child(
        lambda: merge(spec(adapters), use_cache=False, out=out, progress=False),
        {fsio.FAULT_ENV: "build.written"},
    )
    assert kind == "killed" and not out.exists()
    assert [n for n in leftovers(tmp_path) if n.startswith(".hm-build-")]
    merge(spec(adapters), use_cache=False, out=out, progress=False)
    assert leftovers(tmp_path) == [] and _method_of(out) == "ta"


def test_stale_cleanup_spares_live_owners(tmp_path):
    live = fsio.make_temp_dir(tmp_path, ".tmp-k-")  # ours: alive
    dead = tmp_path / f".tmp-k-{fsio._HOST}-999999999-abcd1234"
    dead.mkdir()
    foreign = tmp_path / ".tmp-k-otherhost-1-abcd1234"  # another machine's: only age decides
    foreign.mkdir()
    old = tmp_path / ".tmp-k-otherhost-2-abcd1234"
    old.mkdir()
    os.utime(old, (time.time() - 2 * fsio.STALE_AGE_S,) * 2)
    live_old = fsio.make_temp_dir(tmp_path, ".tmp-j-")  # a live pid, but a week old: a reused pid
    os.utime(live_old, (time.time() - 2 * fsio.LIVE_PID_AGE_S,) * 2)
    live_day = fsio.make_temp_dir(tmp_path, ".tmp-i-")  # a long merge of ours: a day is no reason
    os.utime(live_day, (time.time() - 2 * fsio.STALE_AGE_S,) * 2)
    removed = fsio.clean_stale(tmp_path, ".tmp-")
    assert sorted(p.name for p in removed) == sorted([dead.name, old.name, live_old.name])
    assert live.exists() and foreign.exists() and live_day.exists()


def test_input_edited_in_place_with_mtime_kept_misses(adapters, tmp_path):
    ad = tmp_path / "ad"
    import shutil

    shutil.copytree(adapters[1], ad)
    ads = (adapters[0], ad)
    first = merge(spec(ads), cache_dir=tmp_path / "c", progress=False)
    _flip(ad / "adapter_model.safetensors", keep_mtime=True)
    second = merge(spec(ads), cache_dir=tmp_path / "c", progress=False)
    assert not second.cache_hit and second.path != first.path


def test_torn_input_hash_memo_is_recomputed(adapters, tmp_path):
    first = merge(spec(adapters), cache_dir=tmp_path / "c", progress=False)
    for m in (tmp_path / "c" / "file_hashes").iterdir():
        m.write_text("")  # what a power loss may leave
    again = merge(spec(adapters), cache_dir=tmp_path / "c", progress=False)
    assert again.cache_hit and again.path == first.path


def test_concurrent_publishers_to_one_out(adapters, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    for m in ("ta", "wa"):
        merge(spec(adapters, m), cache_dir=cache, progress=False)
    pids = []
    for i in range(4):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for _ in range(3):
                    merge(spec(adapters, ("ta", "wa")[i % 2]), cache_dir=cache, out=out, progress=False)
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        pids.append(pid)
    codes = [os.waitpid(p, 0)[1] for p in pids]
    assert codes == [0, 0, 0, 0]
    assert _method_of(out) in ("ta", "wa") and _complete(out, cache)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- determinism


DETERMINISM = textwrap.dedent("""
    import sys
    import harness_merge.api as api
    spec = api.MergeSpec(adapters=tuple(sys.argv[3:]), method="ta")
    api.merge(spec, cache_dir=sys.argv[1], out=sys.argv[2], progress=False)
""")


def test_identical_merges_are_byte_identical_across_hash_seeds(adapters, tmp_path):
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run(
            [
                sys.executable,
                "-c",
                DETERMINISM,
                str(tmp_path / f"c{seed}"),
                str(tmp_path / f"o{seed}"),
                *map(str, adapters),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
    a, b = artifact_bytes(tmp_path / "o1"), artifact_bytes(tmp_path / "o2")
    assert a == b and "adapter_config.json" in a
    cfg = json.loads(a["adapter_config.json"])
    assert cfg["target_modules"] == sorted(cfg["target_modules"])


# ---------------------------------------------------------------- OS errors: one line, exit 2


def run_cli(args, capsys, env=None, monkeypatch=None):
    if env and monkeypatch:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    code = cli_main(args)
    err = capsys.readouterr().err
    return code, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("harness-merge: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_cache_env_pointing_at_a_file(adapters, tmp_path, capsys, monkeypatch):
    f = tmp_path / "not_a_dir"
    f.write_text("x")
    code, err = run_cli(
        ["merge", "--adapters", *map(str, adapters), "--method", "ta", "--out", str(tmp_path / "o"), "-q"],
        capsys,
        {"HARNESS_MERGE_CACHE": str(f)},
        monkeypatch,
    )
    line = one_line_error(err)
    assert code == 2 and str(f) in line and "HARNESS_MERGE_CACHE" in line and "is not a folder" in line
    assert not (tmp_path / "o").exists()


def test_out_under_a_file(adapters, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, err = run_cli(
        [
            "merge",
            "--adapters",
            *map(str, adapters),
            "--method",
            "ta",
            "--out",
            str(tmp_path / "f" / "o"),
            "--cache-dir",
            str(tmp_path / "c"),
            "-q",
        ],
        capsys,
    )
    line = one_line_error(err)
    assert code == 2 and "publishing" in line and str(tmp_path / "f") in line


@pytest.mark.parametrize(
    "point,err_name,words",
    [
        ("publish.copied:ENOSPC", "ENOSPC", "No space left on device"),
        ("cache.built:EROFS", "EROFS", "Read-only file system"),
        ("build.written:EACCES", "EACCES", "Permission denied"),
    ],
)
def test_injected_os_errors_are_one_line_and_leave_nothing(
    point, err_name, words, adapters, tmp_path, capsys, monkeypatch
):
    """CPU twin of the tmpfs tests below: the seam raises the OSError."""
    args = ["merge", "--adapters", *map(str, adapters), "--method", "ta", "--out", str(tmp_path / "o"), "-q"]
    args += ["--no-cache"] if point.startswith("build.") else ["--cache-dir", str(tmp_path / "c")]
    code, err = run_cli(args, capsys, {fsio.FAULT_ENV: point}, monkeypatch)
    line = one_line_error(err)
    assert code == 2 and words in line
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []
    if point.startswith("cache."):
        assert list((tmp_path / "c" / "merges").iterdir()) == []
    elif point.startswith("publish."):  # the entry itself was complete and stays (verified)
        assert MergeCache(tmp_path / "c").check(the_entry(tmp_path / "c").name) == ("ok", None)


def test_safetensors_disk_full_is_one_line(adapters, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr("harness_merge.artifact.writer.save_file", full)
    code, err = run_cli(
        [
            "merge",
            "--adapters",
            *map(str, adapters),
            "--method",
            "ta",
            "--out",
            str(tmp_path / "o"),
            "--cache-dir",
            str(tmp_path / "c"),
            "-q",
        ],
        capsys,
    )
    line = one_line_error(err)
    assert code == 2 and "No space left on device" in line and str(tmp_path / "c") in line
    assert list((tmp_path / "c" / "merges").iterdir()) == [] and not (tmp_path / "o").exists()


# -- real filesystems: a small tmpfs, read-only or full (needs root and mount)


@pytest.fixture
def tmpfs(tmp_path):
    mounts = []

    def make(size: str) -> Path:
        d = tmp_path / f"mnt{len(mounts)}"
        d.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
        mounts.append(d)
        return d

    yield make
    for d in reversed(mounts):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _remount_ro(d: Path):
    r = subprocess.run(["mount", "-o", "remount,ro", str(d)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_read_only_cache_serves_hits_and_refuses_misses_in_one_line(adapters, tmp_path, tmpfs, capsys):
    mnt = tmpfs("16m")
    cache = mnt / "cache"
    merge(spec(adapters, "ta"), cache_dir=cache, progress=False)
    _remount_ro(mnt)
    hit = merge(spec(adapters, "ta"), cache_dir=cache, out=tmp_path / "o", progress=False)
    assert hit.cache_hit and _complete(tmp_path / "o", cache)
    code, err = run_cli(
        [
            "merge",
            "--adapters",
            *map(str, adapters),
            "--method",
            "wa",
            "--out",
            str(tmp_path / "o2"),
            "--cache-dir",
            str(cache),
            "-q",
        ],
        capsys,
    )
    line = one_line_error(err)
    assert code == 2 and "Read-only file system" in line and str(cache) in line and "--no-cache" in line
    assert not (tmp_path / "o2").exists()


def test_read_only_out_parent(adapters, tmp_path, tmpfs, capsys):
    mnt = tmpfs("1m")
    _remount_ro(mnt)
    code, err = run_cli(
        [
            "merge",
            "--adapters",
            *map(str, adapters),
            "--method",
            "ta",
            "--out",
            str(mnt / "o"),
            "--cache-dir",
            str(tmp_path / "c"),
            "-q",
        ],
        capsys,
    )
    assert code == 2 and "Read-only file system" in one_line_error(err)


@pytest.mark.parametrize("where", ["cache", "out", "no_cache"])
def test_full_disk_is_one_line_and_leaves_nothing(where, adapters, tmp_path, tmpfs, capsys):
    mnt = tmpfs("8k")  # two pages: room for the config, not for the weights
    args = ["merge", "--adapters", *map(str, adapters), "--method", "ta", "-q"]
    if where == "cache":
        args += ["--cache-dir", str(mnt / "c"), "--out", str(tmp_path / "o")]
    elif where == "out":
        args += ["--cache-dir", str(tmp_path / "c"), "--out", str(mnt / "o")]
    else:
        args += ["--no-cache", "--out", str(mnt / "o")]
    code, err = run_cli(args, capsys)
    assert code == 2 and "No space left on device" in one_line_error(err)
    assert not (tmp_path / "o").exists() and not (mnt / "o").exists()
    assert leftovers(mnt) == [] and leftovers(tmp_path) == []
    if (mnt / "c" / "merges").exists():
        assert list((mnt / "c" / "merges").iterdir()) == []
