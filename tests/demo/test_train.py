"""Brief CPU training: an adapter changes greedy answers and beats the base on its task."""

from __future__ import annotations

import pytest

from harness_merge.demo import data as ddata
from harness_merge.demo import train


def test_make_rows_is_deterministic_and_balanced():
    a, b = ddata.make_rows("shape", 9, seed=3), ddata.make_rows("shape", 9, seed=3)
    assert [r["answer"] for r in a] == ["circle", "square", "triangle"] * 3
    assert all(x["image"].tobytes() == y["image"].tobytes() for x, y in zip(a, b))
    assert ddata.make_rows("shape", 1, seed=4)[0]["image"].tobytes() != a[0]["image"].tobytes()
    with pytest.raises(ValueError, match="unknown demo task 'nope'"):
        ddata.make_rows("nope", 1)


def test_score_is_exact_match_up_to_case_and_full_stop():
    assert ddata.score(" Red. ", "red") == 1.0
    assert ddata.score("red circle", "red") == 0.0


@pytest.fixture(scope="session")
def trained(qwen2vl_dir, tmp_path_factory):
    """Base pre-trained briefly, then a colour adapter (about 10 s on one core)."""
    d = tmp_path_factory.mktemp("trained")
    base = train.pretrain_base(qwen2vl_dir, d / "base", steps=60, n_caption=64, n_per_task=8)
    ad = train.train_lora(base, "colour", d / "colour", steps=80, n_train=96)
    return base, ad


def test_colour_adapter_beats_the_base_and_changes_its_answers(trained):
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    from harness_merge.demo.tiny import load_processor

    base, ad = trained
    proc = load_processor(base)
    rows = ddata.make_rows("colour", 24, seed=7)
    model = Qwen2VLForConditionalGeneration.from_pretrained(base)
    base_answers = train.greedy_answers(model, proc, rows)
    tuned = PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(base), ad)
    tuned_answers = train.greedy_answers(tuned, proc, rows)
    assert tuned_answers != base_answers

    def acc(answers):
        return sum(ddata.score(p, r["answer"]) for p, r in zip(answers, rows)) / len(rows)

    assert acc(tuned_answers) >= acc(base_answers) + 0.25, (base_answers, tuned_answers)
