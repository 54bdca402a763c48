"""Full-checkpoint merges whose work is pointwise (ta, wa, and the
``nonlinear=average`` tensors of every method) run block by block
(``iter_merged(blockwise=True)``, streamed into the output file): the written
weights equal the formula computed here on whole tensors, bit for bit, for
tensors of several blocks with a remainder, of one block, and unchanged ones."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness_merge import merge_loop, methods
from harness_merge.api import MergeSpec, merge
from harness_merge.errors import InputError
from harness_merge.inputs.checkpoint import CheckpointSet
from harness_merge.types import Dense, DenseBlocks

B = merge_loop.BLOCK
SHAPES = {
    "model.embed_tokens.weight": (2 * B // 512 + 3, 512),  # average policy, 2 blocks + remainder
    "model.layers.0.self_attn.q_proj.weight": (3 * B // 256 + 1, 256),  # the method, 3 blocks + remainder
    "model.layers.0.mlp.up_proj.weight": (96, 64),  # one block
    "model.layers.0.input_layernorm.weight": (64,),
    "model.norm.weight": (64,),  # no fine-tune changes it
    "lm_head.weight": (48, 64),
}


def _save(d, sd):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("blockwise")
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in SHAPES.items()}
    _save(root / "base", base)
    fts = []
    for i in (1, 2, 3):
        sd = {
            k: v
            if k == "model.norm.weight"
            else (v.float() + 0.002 * torch.randn(v.shape, generator=g)).to(v.dtype)
            for k, v in base.items()
        }
        _save(root / f"ft{i}", sd)
        fts.append(sd)
    return root, base, fts


def _merged(root, method, params, tmp_path):
    spec = MergeSpec(
        adapters=tuple(str(root / f"ft{i}") for i in (1, 2, 3)),
        method=method,
        base=str(root / "base"),
        params=params,
    )
    art = merge(spec, out=tmp_path / method, use_cache=False, progress=False)
    return load_file(art.path / "model.safetensors")


def _is_matrix(k):
    return len(SHAPES[k]) == 2 and "embed_tokens" not in k and "lm_head" not in k


def test_flat_blocks_cover_in_order_with_the_tail_joined():
    assert merge_loop.flat_blocks(10, 4) == [(0, 4), (4, 10)]
    assert merge_loop.flat_blocks(12, 4) == [(0, 4), (4, 8), (8, 12)]
    assert merge_loop.flat_blocks(7, 4) == [(0, 7)]
    assert merge_loop.flat_blocks(3, 4) == [(0, 3)]


@pytest.mark.parametrize("scaling", [1.0, 0.7])
def test_ta_written_block_by_block_is_the_whole_tensor_formula(checkpoints, tmp_path, scaling):
    root, base, fts = checkpoints
    got = _merged(root, "ta", {"scaling": scaling}, tmp_path)
    for k, b in base.items():
        taus = [ft[k].float() - b.float() for ft in fts]
        if k == "model.norm.weight":
            want = b
        elif _is_matrix(k):  # lambda * sum_n tau_n, added to theta_0 in float32, rounded once
            delta = torch.zeros_like(taus[0])
            for t in taus:
                delta.add_(t, alpha=scaling)
            want = (delta + b.float()).to(b.dtype)
        else:  # nonlinear=average: mean_n tau_n
            want = (torch.stack(taus).mean(dim=0) + b.float()).to(b.dtype)
        assert got[k].dtype == b.dtype and torch.equal(got[k], want), k


def test_wa_base_free_block_by_block_is_the_whole_tensor_formula(checkpoints, tmp_path):
    root, base, fts = checkpoints
    w = [1.0, 2.0, 5.0]
    got = _merged(root, "wa", {"weights": w}, tmp_path)
    for k, b in base.items():
        thetas = [ft[k].float() for ft in fts]
        if k == "model.norm.weight":
            want = fts[0][k]
        elif _is_matrix(k):
            acc = torch.zeros_like(thetas[0])
            for wn, t in zip(w, thetas):
                acc.add_(t, alpha=wn / sum(w))
            want = acc.to(b.dtype)
        else:
            want = torch.stack(thetas).mean(dim=0).to(b.dtype)
        assert torch.equal(got[k], want), k


def test_blockwise_results_join_to_the_whole_tensor_results(checkpoints):
    """The driver's two forms of one merge (non-unit weights): the blocks,
    joined, equal the whole-tensor ``Dense`` results bit for bit."""
    root, _, _ = checkpoints
    inputs = CheckpointSet(
        ["a", "b", "c"], [root / f"ft{i}" for i in (1, 2, 3)], base_ref="base", base_dir=root / "base"
    )
    spec = methods.get("ta")
    params = spec.make_params({"weights": [0.2, 0.3, 0.5], "scaling": 0.7})
    whole = dict(merge_loop.iter_merged(inputs, spec, params, progress=False))
    blocks = dict(merge_loop.iter_merged(inputs, spec, params, progress=False, blockwise=True))
    assert blocks["model.norm.weight"] is None and whole["model.norm.weight"] is None
    for k, r in blocks.items():
        if r is None:
            continue
        assert isinstance(r, DenseBlocks) and isinstance(whole[k], Dense)
        assert len(list(r.blocks())) == len(merge_loop.flat_blocks(whole[k].delta.numel()))
        assert torch.equal(r.delta, whole[k].delta), k
    # not pointwise (ties): the method gets whole tensors; the averaged ones still come in blocks
    ties = dict(
        merge_loop.iter_merged(
            inputs, methods.get("ties"), methods.get("ties").make_params({}), blockwise=True
        )
    )
    assert isinstance(ties["model.layers.0.self_attn.q_proj.weight"], Dense)
    assert isinstance(ties["model.embed_tokens.weight"], DenseBlocks)


def test_non_finite_entry_in_a_later_block_is_refused(checkpoints, tmp_path):
    root, base, fts = checkpoints
    bad = dict(fts[1])
    k = "model.layers.0.self_attn.q_proj.weight"
    t = bad[k].clone()
    t.view(-1)[-1] = float("inf")  # in the last block only
    bad[k] = t
    _save(tmp_path / "ft2", bad)
    spec = MergeSpec(
        adapters=(str(root / "ft1"), str(tmp_path / "ft2"), str(root / "ft3")),
        method="ta",
        base=str(root / "base"),
    )
    with pytest.raises(InputError, match=r"ft2 \[model.layers.0.self_attn.q_proj.weight\]: 1 NaN/Inf"):
        merge(spec, out=tmp_path / "out", use_cache=False, progress=False)


def test_stacked_rows_only_for_consecutive_rows_of_one_buffer():
    from harness_merge.inputs.checkpoint import stacked_rows

    buf = torch.randn(4, 10)
    rows = buf.unbind(0)
    assert stacked_rows(rows) is not None and torch.equal(stacked_rows(rows), buf)
    tail = stacked_rows(rows[1:])
    assert tail.data_ptr() == buf[1].data_ptr() and torch.equal(tail, torch.stack(rows[1:]))
    assert stacked_rows([rows[0], rows[2]]) is None  # not consecutive
    assert stacked_rows([rows[1], rows[0]]) is None  # out of order
    assert stacked_rows([torch.randn(10), torch.randn(10)]) is None  # separate tensors
    assert stacked_rows(buf[:, :5].unbind(0)) is None  # rows of a strided view
