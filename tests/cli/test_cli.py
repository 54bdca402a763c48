"""``harness-merge`` as a user runs it (in-process main and one real subprocess)."""

import json
import shutil
import subprocess
import sys

import pytest

from harness_merge.harness.cli import main


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_merge_command_writes_lora(adapters, tmp_path, capsys):
    out = tmp_path / "merged"
    code, stdout, _ = run(
        [
            "merge",
            "--adapters",
            *map(str, adapters),
            "--method",
            "copa",
            "--param",
            "prune_rate=0.5",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "c"),
            "-q",
        ],
        capsys,
    )
    assert code == 0 and "wrote lora artifact" in stdout and "rank=4" in stdout
    man = json.loads((out / "harness_merge.json").read_text())
    assert man["params"]["prune_rate"] == 0.5 and man["params"]["clamp_quantile"] == 0.8
    code, stdout, _ = run(
        [
            "merge",
            "--adapters",
            *map(str, adapters),
            "--method",
            "copa",
            "--param",
            "prune_rate=0.5",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "c"),
            "-q",
        ],
        capsys,
    )
    assert code == 0 and "(cache hit)" in stdout


def test_recipe_yaml(adapters, tmp_path, capsys):
    for i, a in enumerate(adapters):
        shutil.copytree(a, tmp_path / f"ad{i}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: ties\nadapters: [ad0, ad1, ad2]\nparameters: {prune_rate: 0.5, weights: [1, 2, 1]}\nout: merged\nrank: 3\n"
    )
    code, stdout, err = run(["merge", str(recipe), "--no-cache", "-q"], capsys)
    assert code == 0, err
    man = json.loads((tmp_path / "merged" / "harness_merge.json").read_text())
    assert (
        man["method"] == "ties" and man["params"]["weights"] == [1.0, 2.0, 1.0] and man["result"]["rank"] == 3
    )
    assert "svd_rel_error" in stdout


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--method", "copaa"], "unknown method 'copaa'. Did you mean: copa"),
        (["--method", "copa", "--param", "prune_rate=1.5"], r"copa: prune_rate must be in \[0, 1\), got 1.5"),
        (["--method", "copa", "--param", "prune=0.5"], "unknown parameter 'prune'; known parameters:"),
        (["--method", "copa", "--param", "scaling=-1"], "scaling must be >= 0"),
        (["--method", "ta", "--param", "noequals"], "--param expects KEY=VALUE"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(adapters, tmp_path, capsys, extra, match):
    import re

    out = tmp_path / "o"
    code, _, err = run(
        [
            "merge",
            "--adapters",
            *map(str, adapters),
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "c"),
            *extra,
        ],
        capsys,
    )
    assert code == 2 and re.search(match, err), err
    assert not out.exists()
    assert not (tmp_path / "c" / "merges").exists() or not any((tmp_path / "c" / "merges").iterdir())


def test_missing_adapter_folder(tmp_path, capsys, adapters):
    code, _, err = run(
        [
            "merge",
            "--adapters",
            str(adapters[0]),
            str(tmp_path / "missing"),
            "--method",
            "ta",
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 2 and "missing: no such folder" in err


def test_methods_lists_every_method_with_defaults(capsys):
    code, stdout, _ = run(["methods"], capsys)
    assert code == 0
    for name in ("copa", "ta", "wa", "ties", "dare", "dare_ties"):
        assert f"\n{name} " in "\n" + stdout
    assert "prune_rate=0.8" in stdout and "combine='product_of_sums'" in stdout
    # the variants are named with their choices, and a dense wudi run's cost is stated
    assert (
        "keep_rule='released' (released|exact)" in stdout
        and "spectrum='full' (full|numerical_rank)" in stdout
    )
    assert "recipe='qwen2vl' (qwen2vl|internvl|by_input)" in stdout and "TFLOP" in stdout


def test_console_script_runs(adapters, tmp_path):
    exe = shutil.which("harness-merge") or str(
        __import__("pathlib").Path(sys.executable).parent / "harness-merge"
    )
    res = subprocess.run(
        [
            exe,
            "merge",
            "--adapters",
            *map(str, adapters),
            "--method",
            "ta",
            "--out",
            str(tmp_path / "o"),
            "--no-cache",
            "-q",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


def test_regress_subcommand_receives_its_options(tmp_path, capsys):
    code, _, err = run(
        ["regress", "--baseline", str(tmp_path / "a.json"), "--results", str(tmp_path / "b.json")], capsys
    )
    assert code == 2 and "unrecognized arguments" not in err
