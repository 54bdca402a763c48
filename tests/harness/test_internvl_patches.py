"""``min_patches`` / ``max_patches`` in model_args: InternVL's tiling bounds,
given to the processor over the ``internvl`` profile's 1 / 12 (lmms-eval's
``internvl_hf_chat`` values), as ``min_pixels`` / ``max_pixels`` are for Qwen2-VL."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from harness_merge.demo.tiny import build_tiny_internvl

    return str(build_tiny_internvl(tmp_path_factory.mktemp("internvl_patches") / "internvl", seed=0))


def _bounds(model):
    ip = model.backend.processor.image_processor
    return ip.min_patches, ip.max_patches


def test_patch_bounds_reach_the_processor(base):
    from harness_merge.harness.lmms_model import MergedLMM

    default = MergedLMM.create_from_arg_string(f"pretrained={base},method=none,dtype=float32", {})
    assert default.profile.name == "internvl"
    assert _bounds(default) == (1, 12)  # the profile's (lmms-eval internvl_hf_chat)
    user = MergedLMM.create_from_arg_string(
        f"pretrained={base},method=none,dtype=float32,min_patches=2,max_patches=4", {}
    )
    assert _bounds(user) == (2, 4)  # the user's over the profile's


def test_patch_bounds_checked(base):
    from harness_merge.harness.model_args import ModelArgsError, parse_model_args

    h = parse_model_args(f"pretrained={base},method=none,min_patches=2,max_patches=6")
    assert (h.backend_opts["min_patches"], h.backend_opts["max_patches"]) == (2, 6)
    with pytest.raises(ModelArgsError, match=r"min_patches=8 is above max_patches=4"):
        parse_model_args(f"pretrained={base},method=none,min_patches=8,max_patches=4")
    with pytest.raises(ModelArgsError, match=r"max_patches"):
        parse_model_args(f"pretrained={base},method=none,max_patches=0")
