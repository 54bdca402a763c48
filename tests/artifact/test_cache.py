"""The merge cache: a hit does no merge work; a killed merge leaves no entry;
two concurrent merges of one key produce one entry."""

import signal
import subprocess
import sys
import textwrap
import time

from harness_merge import merge_loop
from harness_merge.api import MergeSpec, merge


def test_second_merge_is_a_hit_and_does_no_work(adapters, cache_dir, monkeypatch):
    spec = MergeSpec(adapters=tuple(map(str, adapters)), method="copa")
    first = merge(spec, cache_dir=cache_dir, progress=False)
    calls = []
    real = merge_loop.iter_merged
    monkeypatch.setattr("harness_merge.api.iter_merged", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = merge(spec, cache_dir=cache_dir, progress=False)
    assert second.cache_hit and not first.cache_hit and calls == []
    assert second.path == first.path
    third = merge(
        MergeSpec(adapters=spec.adapters, method="copa", params={"prune_rate": "0.5"}),
        cache_dir=cache_dir,
        progress=False,
    )
    assert not third.cache_hit and calls == [1] and third.path != first.path


def test_changed_adapter_bytes_miss(adapters, cache_dir, tmp_path, tiny_base, make_adapter):
    import shutil

    ad = tmp_path / "copy"
    shutil.copytree(adapters[1], ad)
    spec = MergeSpec(adapters=(str(adapters[0]), str(ad)), method="ta")
    a = merge(spec, cache_dir=cache_dir, progress=False)
    make_adapter(tiny_base, ad, seed=42)  # same path, new bytes
    b = merge(spec, cache_dir=cache_dir, progress=False)
    assert not b.cache_hit and a.path != b.path


SLOW_MERGE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import harness_merge.api as api
    real = api.iter_merged
    def slow(*a, **k):
        for i, item in enumerate(real(*a, **k)):
            if i == 1:
                Path(sys.argv[1]).write_text("started")
                time.sleep(60)
            yield item
    api.iter_merged = slow
    spec = api.MergeSpec(adapters=tuple(sys.argv[3:]), method="ta")
    api.merge(spec, cache_dir=sys.argv[2], progress=False)
""")


def test_killed_merge_leaves_no_cache_entry(adapters, cache_dir, tmp_path):
    marker = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, str(marker), str(cache_dir), *map(str, adapters)]
    )
    try:
        for _ in range(600):
            if marker.exists():
                break
            time.sleep(0.1)
        assert marker.exists(), "the merge subprocess never started merging"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    merges = cache_dir / "merges"
    assert [p for p in merges.iterdir() if not p.name.startswith(".tmp-")] == []
    art = merge(
        MergeSpec(adapters=tuple(map(str, adapters)), method="ta"), cache_dir=cache_dir, progress=False
    )
    assert not art.cache_hit and (art.path / "adapter_model.safetensors").is_file()
    assert [p.name for p in merges.iterdir()] == [art.path.name]  # the dead temp folder was cleaned


CONCURRENT = textwrap.dedent("""
    import json, sys
    import harness_merge.api as api
    art = api.merge(api.MergeSpec(adapters=tuple(sys.argv[2:]), method="copa"), cache_dir=sys.argv[1], progress=False)
    print(json.dumps({"path": str(art.path), "hit": art.cache_hit}))
""")


def test_concurrent_merges_share_one_entry(adapters, cache_dir):
    import json

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, str(cache_dir), *map(str, adapters)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert outs[0]["path"] == outs[1]["path"]
    assert sorted(o["hit"] for o in outs) == [False, True]
    assert len(list((cache_dir / "merges").iterdir())) == 1
