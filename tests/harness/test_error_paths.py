"""Error paths of model ``merged`` in-process: the exception the harness sees
and the banner on stderr (``harness-merge ERROR``) that reaches the user.

The same checks used to run the real ``lmms_eval`` / ``lm-eval-merged``
commands (26-60 s each); one subprocess test still does
(``test_lmms_e2e.py::test_unknown_model_arg_is_visible_and_fails``: exit status
and banner through the console script). Here the model class is built as the
harness builds it (``create_from_arg_string``), and the console scripts' exit
logic is run in-process on a real failure of the model.
"""

from __future__ import annotations

import re

import pytest

from harness_merge.backends.base import BackendError
from harness_merge.errors import InputError, MethodParamError
from harness_merge.harness.model_args import ModelArgsError

pytest.importorskip("lmms_eval")
pytest.importorskip("lm_eval")


def _model_args(base, adapters, method="copa", **extra) -> str:
    parts = [f"pretrained={base}", f"adapters=[{','.join(str(a) for a in adapters)}]", f"method={method}"]
    parts += [f"{k}={v}" for k, v in extra.items()]
    return ",".join(parts)


def _lmms(model_args: str):
    from harness_merge.harness.lmms_model import MergedLMM

    return MergedLMM.create_from_arg_string(model_args, {"batch_size": 2})


def _lm_eval(model_args: str):
    from harness_merge.harness.lm_eval_model import MergedLM

    return MergedLM.create_from_arg_string(model_args, {"batch_size": 2})


# -- lmms-eval model 'merged' ---------------------------------------------------
def test_lmms_unknown_method_is_visible_and_fails(qwen2vl, capsys, failures):
    base, ads = qwen2vl
    with pytest.raises(MethodParamError, match=r"unknown method 'copaa'.*copa"):
        _lmms(_model_args(base, ads, "copaa"))
    err = capsys.readouterr().err
    assert "unknown method 'copaa'" in err and "copa" in err
    assert "harness-merge ERROR (lmms-eval model 'merged': load)" in err
    assert len(failures) == 1 and "unknown method 'copaa'" in failures[0]


def test_lmms_misfit_adapter_is_visible_and_fails(qwen2vl, misfit_adapter, capsys, failures):
    base, ads = qwen2vl
    with pytest.raises(InputError, match=re.escape(str(misfit_adapter))):
        _lmms(_model_args(base, [ads[0], misfit_adapter], "ta"))
    err = capsys.readouterr().err
    assert "harness-merge ERROR" in err
    assert str(misfit_adapter) in err
    assert len(failures) == 1 and str(misfit_adapter) in failures[0]


def test_lmms_text_only_base_with_image_task_fails_clearly(text_lm, merge_cache, capsys, failures):
    """The model loads (a text-only base); the first image request fails."""
    from lmms_eval.api.instance import Instance
    from PIL import Image

    base, ads = text_lm
    m = _lmms(_model_args(base, ads[:1], "ta", cache_dir=merge_cache))
    assert failures == []
    m.task_dict = {"hm_pope_mini": {"test": [{"image": Image.new("RGB", (56, 56), (200, 30, 30))}]}}
    inst = Instance(
        request_type="generate_until",
        arguments=(
            "Is there a red square in the image?",
            {"max_new_tokens": 6, "until": ["\n"], "temperature": 0, "do_sample": False},
            lambda doc: [doc["image"]],
            0,
            "hm_pope_mini",
            "test",
        ),
        idx=0,
        metadata={"task": "hm_pope_mini", "doc_id": 0, "repeats": 1},
    )
    with pytest.raises(BackendError, match="text-only"):
        m.generate_until([inst])
    err = capsys.readouterr().err
    assert "text-only" in err and "harness-merge ERROR (lmms-eval model 'merged': generate_until)" in err
    assert len(failures) == 1 and "text-only" in failures[0]


def test_lmms_cli_turns_a_recorded_failure_into_exit_status_1(capsys, failures):
    """lmms-eval logs a model's exception and exits 0; the wrapper exits 1 with a summary."""
    from harness_merge.harness import lmms_cli

    assert lmms_cli._finish(0) == 0
    failures.append("lmms-eval model 'merged': load: unknown method 'copaa'")
    assert lmms_cli._finish(0) == 1 and lmms_cli._finish(None) == 1 and lmms_cli._finish(3) == 3
    err = capsys.readouterr().err
    assert "[harness-merge] the run failed:" in err and "unknown method 'copaa'" in err


# -- lm-eval model 'merged' -----------------------------------------------------
def test_lm_eval_unknown_key_fails_visibly(text_lm, capsys, failures):
    base, ads = text_lm
    with pytest.raises(ModelArgsError, match="scaling"):
        _lm_eval(f"pretrained={base},adapters=[{ads[0]}],method=ta,scalin=2")
    err = capsys.readouterr().err
    assert "harness-merge ERROR" in err and "scaling" in err
    assert len(failures) == 1 and "scalin" in failures[0]


def test_lm_eval_misfit_adapter_fails_visibly(text_lm, qwen2vl, capsys, failures):
    base, ads = text_lm
    other = qwen2vl[1][0]  # an adapter for the Qwen2-VL base
    with pytest.raises(InputError, match=re.escape(str(other))):
        _lm_eval(f"pretrained={base},adapters=[{ads[0]},{other}],method=ta")
    err = capsys.readouterr().err
    assert "harness-merge ERROR" in err and str(other) in err


def test_lm_eval_cli_exits_1_with_the_summary(text_lm, capsys, failures, monkeypatch):
    """``lm-eval-merged``'s exit logic on a real load failure of the model (lm-eval's
    own CLI replaced by what it does with --model merged: build the model)."""
    import lm_eval.__main__ as lm_main

    from harness_merge.harness import lm_eval_cli

    base, ads = text_lm
    bad = f"pretrained={base},adapters=[{ads[0]}],method=ta,scalin=2"
    monkeypatch.setattr(lm_main, "cli_evaluate", lambda: _lm_eval(bad))
    with pytest.raises(SystemExit) as ei:
        lm_eval_cli.main()
    assert ei.value.code == 1
    err = capsys.readouterr().err
    assert "harness-merge ERROR" in err and "scaling" in err
    assert "[harness-merge] the run failed:" in err and "lm-eval model 'merged': load" in err
