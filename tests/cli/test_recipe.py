"""mergekit recipes: translation to our methods, and parity with mergekit 0.1.5's
own merges (run in-process on the same tiny checkpoints) where the conventions
agree: the linear maps of linear, task_arithmetic, ties (equal weights) and
dare_linear at density 1. Embeddings and norms follow our average policy, so
they are compared only where mergekit's result is the same (equal weights)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from harness_merge.harness.cli import main
from harness_merge.recipe import RecipeError, load_recipe, translate_param_names

EMBED = re.compile(r"embed_tokens|lm_head")


@pytest.fixture(scope="module")
def checkpoints(tiny_base, tmp_path_factory):
    """The tiny Qwen2 base and two fine-tuned checkpoints (base + seeded noise on every tensor)."""
    root = tmp_path_factory.mktemp("mk")
    base = tiny_base
    fts = []
    for i in (1, 2):
        d = root / f"ft{i}"
        shutil.copytree(base, d)
        sd = load_file(d / "model.safetensors")
        g = torch.Generator().manual_seed(i)
        save_file(
            {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in sd.items()},
            d / "model.safetensors",
            metadata={"format": "pt"},
        )
        fts.append(d)
    return root, base, fts


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _mergekit(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    pytest.importorskip("mergekit", reason="mergekit (the test extra) is not installed")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(
        MergeConfiguration.model_validate(cfg),
        str(out),
        options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=False),
    )
    return _weights(out)


def _ours(cfg: dict, root: Path, name: str, capsys) -> tuple[dict[str, torch.Tensor], str]:
    recipe = root / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    code = main(["merge", str(recipe), "--out", str(root / f"ours_{name}"), "--no-cache", "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    return _weights(root / f"ours_{name}"), err


def _cfg(method, base, fts, model_params, params=None):
    cfg = {
        "merge_method": method,
        "base_model": str(base),
        "dtype": "float32",
        "models": [{"model": str(f), "parameters": p} for f, p in zip(fts, model_params)],
    }
    if params:
        cfg["parameters"] = params
    return cfg


CASES = {
    "task_arithmetic": ([{"weight": 0.7}, {"weight": 0.3}], {"lambda": 0.8}),
    "linear": ([{"weight": 1.0}, {"weight": 3.0}], None),
    "ties": ([{"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}], {"lambda": 1.3}),
    "dare_linear": ([{"weight": 0.6, "density": 1.0}, {"weight": 0.4, "density": 1.0}], None),
}


@pytest.mark.parametrize("method", list(CASES))
def test_matches_mergekit_on_linear_maps(checkpoints, tmp_path, capsys, method):
    _, base, fts = checkpoints
    cfg = _cfg(method, base, fts, *CASES[method])
    if method == "linear":  # mergekit's linear averages the base too when it is named; leave it out
        del cfg["base_model"]
    theirs = _mergekit(cfg, tmp_path / "mk")
    ours, err = _ours(cfg, tmp_path, method, capsys)
    assert "mergekit recipe -> method=" in err and "embeddings, lm_head and 1-D tensors" in err
    compared = 0
    for k, v in theirs.items():
        if v.dim() == 2 and not EMBED.search(k):
            torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-6, msg=f"{method}: {k}")
            compared += 1
    assert compared == 14  # 2 layers x (q, k, v, o, gate, up, down)


def test_linear_equal_weights_matches_everywhere(checkpoints, tmp_path, capsys):
    """Equal weights: our average policy for embeddings and norms is mergekit's result too."""
    _, _, fts = checkpoints
    cfg = {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in fts],
    }  # no base_model
    theirs = _mergekit(cfg, tmp_path / "mk")
    ours, err = _ours(cfg, tmp_path, "linear_eq", capsys)
    assert "task vectors taken against the first model" in err
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_ties_unequal_weights_differ_and_say_so(checkpoints, tmp_path, capsys):
    _, base, fts = checkpoints
    cfg = _cfg("ties", base, fts, [{"weight": 1.0, "density": 0.5}, {"weight": 3.0, "density": 0.5}])
    theirs = _mergekit(cfg, tmp_path / "mk")
    ours, err = _ours(cfg, tmp_path, "ties_w", capsys)
    assert "mergekit elects the sign on the weighted deltas" in err
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(ours[k], theirs[k], atol=1e-6)


def test_translation(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "merge_method": "dare_ties",
                "base_model": "b",
                "models": [
                    {"model": "b"},
                    {"model": "x", "parameters": {"density": 0.3, "weight": 2}},
                    {"model": "y", "parameters": {"density": 0.3, "weight": 1}},
                ],
                "parameters": {"lambda": 0.5},
            }
        )
    )
    r = load_recipe(p)
    assert r.method == "dare_ties" and r.adapters == ["x", "y"] and r.base == "b"
    assert r.params["drop_rate"] == pytest.approx(0.7) and r.params["scaling"] == 0.5
    assert r.params["weights"] == pytest.approx([4 / 3, 2 / 3]) and r.params["rescale"] is True
    assert any("L1 ratio" in n for n in r.notes) and any("random masks" in n for n in r.notes)
    # mergekit's base+lora syntax -> LoRA adapters on that base
    p.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "models": [
                    {"model": "B+la", "parameters": {"weight": 1}},
                    {"model": "B+lb", "parameters": {"weight": 1}},
                ],
            }
        )
    )
    r = load_recipe(p)
    assert r.method == "ta" and r.adapters == ["la", "lb"] and r.base == "B"


@pytest.mark.parametrize(
    "doc,match",
    [
        (
            {"merge_method": "slerp", "base_model": "b", "models": ["x"]},
            "merge_method 'slerp' has no harness-merge",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "x", "parameters": {"density": [0.1, 0.5]}}],
            },
            r"models\[0\] parameter 'density': per-layer gradients",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [
                    {"model": "x", "parameters": {"density": 0.2}},
                    {"model": "y", "parameters": {"density": 0.4}},
                ],
            },
            "per-model densities",
        ),
        ({"merge_method": "ties", "models": ["x", "y"]}, "needs 'base_model'"),
        (
            {"merge_method": "ties", "base_model": "b", "models": ["x"], "slices": []},
            r"key\(s\) \['slices'\]",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "x", "parameters": {"gamma": 1}}],
            },
            r"unknown mergekit parameter\(s\) \['gamma'\]",
        ),
    ],
)
def test_bad_mergekit_recipes_name_the_key(tmp_path, doc, match):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(RecipeError, match=match):
        load_recipe(p)


def test_mergekit_param_names_on_the_command_line():
    out, notes = translate_param_names("ties", {"density": "0.2", "lambda": "0.5"})
    assert out == {"prune_rate": pytest.approx(0.8), "scaling": "0.5"} and len(notes) == 2
    assert translate_param_names("dare", {"density": "0.25"})[0] == {"drop_rate": 0.75}
    with pytest.raises(RecipeError, match="density.*no equivalent"):
        translate_param_names("copa", {"density": "0.2"})


def test_cli_density_merges(adapters, tmp_path, capsys):
    code = main(
        [
            "merge",
            "--adapters",
            *map(str, adapters[:2]),
            "--method",
            "ties",
            "--param",
            "density=0.2",
            "--out",
            str(tmp_path / "o"),
            "--no-cache",
            "-q",
            "--rank",
            "4",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "prune_rate=0.8" in err
    import json

    assert json.loads((tmp_path / "o" / "harness_merge.json").read_text())["params"][
        "prune_rate"
    ] == pytest.approx(0.8)
