"""The content hash: xxh3_128 by default, sha256 by name; weights hashed as
they are written; every record names its algorithm and is verified with it."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import xxhash

from harness_merge.api import MergeSpec, merge
from harness_merge.artifact import fsio
from harness_merge.artifact.cache import FILES_RECORD, MANIFEST, MergeCache
from harness_merge.artifact.full_weights import save_tensors
from harness_merge.errors import ArtifactError
from harness_merge.harness.cli import main as cli_main

ORACLES = {
    "xxh3_128": lambda b: xxhash.xxh3_128(b).hexdigest(),
    "sha256": lambda b: hashlib.sha256(b).hexdigest(),
}


def ta(adapters) -> MergeSpec:
    return MergeSpec(adapters=tuple(map(str, adapters)), method="ta")


@pytest.mark.parametrize("algo", sorted(ORACLES))
def test_hash_file_matches_the_library(tmp_path, algo):
    for n in (0, 1, 5 << 20):
        p = tmp_path / f"f{n}"
        data = os.urandom(n)
        p.write_bytes(data)
        assert fsio.hash_file(p, algo) == (ORACLES[algo](data), n)


@pytest.mark.parametrize("algo", sorted(ORACLES))
def test_writer_hashes_what_it_writes(tmp_path, algo):
    p = tmp_path / "w.safetensors"
    tensors = {"a": torch.randn(300, 7), "b": torch.arange(11, dtype=torch.int64)}
    with fsio.hash_on_write(algo):
        save_tensors(tensors, p)
    assert fsio.written_digest(p, algo) == ORACLES[algo](p.read_bytes())
    assert fsio.written_digest(p, algo) is None  # taken once


def test_a_file_changed_after_its_writer_closed_is_not_taken_from_the_note(tmp_path):
    p = tmp_path / "w.safetensors"
    with fsio.hash_on_write("xxh3_128"):
        save_tensors({"a": torch.ones(64)}, p)
    with open(p, "r+b") as f:  # same size, other bytes, later mtime
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x7f")
    assert fsio.written_digest(p, "xxh3_128") is None
    with fsio.hash_on_write("xxh3_128"):
        save_tensors({"a": torch.ones(64)}, p)
    assert fsio.written_digest(p, "sha256") is None  # noted under another algorithm


def test_no_hashing_outside_a_build(tmp_path):
    p = tmp_path / "w.safetensors"
    save_tensors({"a": torch.ones(8)}, p)
    assert fsio.written_digest(p, "xxh3_128") is None


def test_seal_takes_the_weights_digest_from_the_writer(adapters, cache_dir, monkeypatch):
    hashed = []
    real = fsio.hash_file
    monkeypatch.setattr(fsio, "hash_file", lambda p, algo: hashed.append(Path(p)) or real(p, algo))
    art = merge(ta(adapters), cache_dir=cache_dir, progress=False)
    assert not art.cache_hit
    written = {p.name for p in hashed if cache_dir in p.parents}  # not the inputs
    assert "adapter_model.safetensors" not in written  # hashed on the way out, not read back
    assert {"adapter_config.json", MANIFEST} <= written  # small files: hashed when sealed
    rec = json.loads((art.path / FILES_RECORD).read_text())["files"]
    data = (art.path / "adapter_model.safetensors").read_bytes()
    assert rec["adapter_model.safetensors"] == {"size": len(data), "xxh3_128": ORACLES["xxh3_128"](data)}


def test_sha256_by_name_and_by_environment(adapters, cache_dir, monkeypatch):
    art = merge(ta(adapters), cache_dir=cache_dir, progress=False, content_hash="sha256")
    rec = json.loads((art.path / FILES_RECORD).read_text())["files"]
    for rel, r in rec.items():
        assert r == {
            "size": (art.path / rel).stat().st_size,
            "sha256": ORACLES["sha256"]((art.path / rel).read_bytes()),
        }
    assert all(len(a["sha256"]) == 64 for a in art.manifest["adapters"])
    assert "content_hash" not in art.manifest  # sha256 manifests are as they were before the choice
    default = merge(ta(adapters), cache_dir=cache_dir, progress=False)
    assert default.path != art.path and not default.cache_hit  # another key: the digests differ
    monkeypatch.setenv(fsio.HASH_ENV, "sha256")
    again = merge(ta(adapters), cache_dir=cache_dir, progress=False)
    assert again.cache_hit and again.path == art.path


@pytest.mark.parametrize("algo", sorted(ORACLES))
def test_damage_is_found_with_the_recorded_algorithm(adapters, cache_dir, algo):
    art = merge(ta(adapters), cache_dir=cache_dir, progress=False, content_hash=algo)
    p = art.path / "adapter_model.safetensors"
    st = p.stat()
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:  # one flipped byte, mtime restored: only the digest can tell
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    os.chmod(p, stat.S_IMODE(st.st_mode))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    # a cache opened with the *other* default still checks this entry with its own record's algorithm
    other = "sha256" if algo == "xxh3_128" else "xxh3_128"
    state, why = MergeCache(cache_dir, content_hash=other).check(art.path.name)
    assert state == "damaged" and algo in why
    rebuilt = merge(ta(adapters), cache_dir=cache_dir, progress=False, content_hash=algo)
    assert not rebuilt.cache_hit and any((cache_dir / "damaged").iterdir())


def test_a_record_without_a_digest_is_damaged(adapters, cache_dir):
    art = merge(ta(adapters), cache_dir=cache_dir, progress=False)
    rec_path = art.path / FILES_RECORD
    rec = json.loads(rec_path.read_text())
    rec["files"]["adapter_config.json"] = {"size": rec["files"]["adapter_config.json"]["size"], "md5": "x"}
    os.chmod(rec_path, 0o644)
    rec_path.write_text(json.dumps(rec))
    state, why = MergeCache(cache_dir).check(art.path.name)
    assert state == "damaged" and "adapter_config.json" in why


def test_unknown_content_hash_is_refused_naming_where(adapters, cache_dir, monkeypatch):
    with pytest.raises(ArtifactError, match=r"content_hash='md5'.*xxh3_128, sha256"):
        merge(ta(adapters), cache_dir=cache_dir, progress=False, content_hash="md5")
    monkeypatch.setenv(fsio.HASH_ENV, "blake3")
    with pytest.raises(ArtifactError, match=r"HARNESS_MERGE_HASH='blake3'"):
        merge(ta(adapters), cache_dir=cache_dir, progress=False)
    assert not (cache_dir / "merges").exists() or not any((cache_dir / "merges").iterdir())


def test_cli_content_hash(adapters, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["merge", "--method", "ta", "--adapters", *map(str, adapters), "--out", str(out)]
    assert cli_main([*args, "--cache-dir", str(tmp_path / "c"), "--content-hash", "sha256"]) == 0
    man = json.loads((out / MANIFEST).read_text())
    assert all(len(a["sha256"]) == 64 for a in man["adapters"])
    with pytest.raises(SystemExit):
        cli_main([*args, "--content-hash", "md5"])
    assert "invalid choice: 'md5'" in capsys.readouterr().err


def test_a_writeback_error_of_the_background_sync_fails_the_merge(adapters, cache_dir, monkeypatch):
    """The early writeback reports what it met: an ENOSPC of fdatasync (delayed
    allocation) fails the merge in one line and leaves no entry."""
    import errno

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsio.HashingWriter, "SYNC_EVERY", 1)  # a writeback after every write
    monkeypatch.setattr(fsio.os, "fdatasync", no_space)
    with pytest.raises(
        ArtifactError, match=r"adapter_model\.safetensors: writing back: No space left.*free some space"
    ):
        merge(ta(adapters), cache_dir=cache_dir, progress=False)
    assert [p for p in (cache_dir / "merges").iterdir()] == []
