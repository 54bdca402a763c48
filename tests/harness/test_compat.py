"""Hooks into lmms-eval / lm-eval / transformers private names
(harness_merge._compat, harness_merge.harness._compat): each binds on the pinned
versions, and a missing or reshaped target warns instead of raising. Plus the
import-order bug of lmms-eval's plugin registry."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import tomllib

from harness_merge import _compat as C
from harness_merge._compat import HookWarning
from harness_merge.harness import _compat as HC

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def strict():
    """Any HookWarning is an error (a hook that binds says nothing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", HookWarning)
        yield


# -- the gate ----------------------------------------------------------------
def test_version_checked():
    assert C.version_checked("0.7.3", "==0.7.3")
    assert not C.version_checked("0.7.4", "==0.7.3")
    assert C.version_checked("5.19.0", ">=5.16.1,<5.20")
    assert C.version_checked("5.16.1", ">=5.16.1,<5.20")
    assert not C.version_checked("5.20.0", ">=5.16.1,<5.20")
    assert not C.version_checked("5.16.0", ">=5.16.1,<5.20")
    assert C.version_checked("5.19.0.dev0", ">=5.16.1,<5.20")
    assert not C.version_checked(None, "==0.7.3")
    with pytest.raises(ValueError, match=r"bad version clause '~=1\.0'"):
        C.version_checked("1.0", "~=1.0")


def test_hooks_are_checked_against_the_pinned_versions():
    """The installed (locked) harness versions and the pyproject transformers
    range are the ones every hook was checked against."""
    for hook in (*HC.HOOKS, C.PROCESSOR_ARGUMENT_CHECK):
        version = C.installed_version(hook.package)
        assert C.version_checked(version, hook.checked), (hook.name, version, hook.checked)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*deps["dependencies"], *(r for extra in deps["optional-dependencies"].values() for r in extra)]
    pins = {r.split("=")[0].split(">")[0].split("<")[0].strip(): r for r in reqs}
    assert pins["transformers"] == "transformers" + C.PROCESSOR_ARGUMENT_CHECK.checked
    assert pins["lmms-eval"] == "lmms-eval" + HC.LMMS_CHECKED
    assert pins["lm-eval"] == "lm-eval" + HC.LM_EVAL_CHECKED


@pytest.mark.parametrize("hook", [*HC.HOOKS, C.PROCESSOR_ARGUMENT_CHECK], ids=lambda h: h.name)
def test_every_hook_binds_on_the_pinned_versions(hook, strict):
    owner, attr, value = C.bind(hook)
    assert getattr(owner, attr) is value and callable(value)


def test_an_unchecked_version_binds_with_a_warning(monkeypatch):
    monkeypatch.setattr(C, "installed_version", lambda package: "0.9.1")
    with pytest.warns(
        HookWarning,
        match=r"bound to lmms_eval\.evaluator:_redact_eval_config_secrets on "
        r"lmms-eval 0\.9\.1, a version it was not checked against \(lmms-eval==0\.7\.3\)",
    ):
        found = C.bind(HC.RESULTS_RECORD)
    assert found is not None


# -- lmms-eval: config.merge in the results ----------------------------------
@pytest.fixture
def evaluator(monkeypatch):
    import lmms_eval.evaluator as ev

    # the unwrapped original during the test (an earlier test in this worker may have
    # installed the hook already), restored after it, whatever the test installs
    current = ev._redact_eval_config_secrets
    monkeypatch.setattr(ev, "_redact_eval_config_secrets", getattr(current, "__wrapped__", current))
    return ev


def test_results_record_binds_and_adds_config_merge(evaluator, strict):
    orig = evaluator._redact_eval_config_secrets
    record = {"method": "ta", "model_name": "x__ta-1234abcd"}
    assert HC.install_results_record(lambda: record) is True
    assert HC.install_results_record(lambda: record) is True  # once: no wrapper around the wrapper
    wrapped = evaluator._redact_eval_config_secrets
    assert wrapped is not orig and wrapped.__wrapped__ is orig
    config = {"model_args": "pretrained=/b", "model_backend": "m", "api_key": "secret"}
    out = wrapped(config)
    assert out["merge"] == record and out["api_key"] == "[REDACTED]"
    assert "merge" not in config
    assert "merge" not in wrapped({"model_args": "pretrained=/b"})  # not the results' config


def test_results_record_missing_target_warns(evaluator, monkeypatch):
    monkeypatch.delattr(evaluator, "_redact_eval_config_secrets")
    with pytest.warns(
        HookWarning,
        match=r"'config\.merge in lmms-eval results' did not bind: lmms_eval\.evaluator:"
        r"_redact_eval_config_secrets is missing .*lmms-eval 0\.7\.3.*the results JSON has no config\.merge",
    ):
        assert HC.install_results_record(lambda: {}) is False


def test_results_record_other_signature_warns(evaluator, monkeypatch):
    monkeypatch.setattr(evaluator, "_redact_eval_config_secrets", lambda value, keys: value)
    with pytest.warns(
        HookWarning, match=r"has parameters \('value', 'keys'\), the hook expects \('value',\)"
    ):
        assert HC.install_results_record(lambda: {}) is False


# -- lmms-eval: errors of one evaluation --------------------------------------
@pytest.fixture
def lmms_main(monkeypatch):
    import lmms_eval.__main__ as m

    monkeypatch.setattr(m, "cli_evaluate_single", m.cli_evaluate_single)
    return m


def test_evaluation_errors_binds_and_reports(lmms_main, monkeypatch, strict):
    orig = lmms_main.cli_evaluate_single
    seen: list[BaseException] = []
    assert HC.watch_evaluations(seen.append) is True
    assert lmms_main.cli_evaluate_single.__wrapped__ is orig

    def failing(args=None):
        raise RuntimeError("task exploded")

    monkeypatch.setattr(lmms_main, "cli_evaluate_single", failing)
    assert HC.watch_evaluations(seen.append) is True
    with pytest.raises(RuntimeError, match="task exploded"):
        lmms_main.cli_evaluate_single(None)
    assert [str(e) for e in seen] == ["task exploded"]


def test_evaluation_errors_missing_target_warns(lmms_main, monkeypatch):
    monkeypatch.delattr(lmms_main, "cli_evaluate_single")
    with pytest.warns(
        HookWarning, match=r"lmms_eval\.__main__:cli_evaluate_single is missing.*exit status 0"
    ):
        assert HC.watch_evaluations(lambda e: None) is False


# -- lmms-eval: loglikelihood tuples ------------------------------------------
def test_loglikelihood_result_survives_lmms_eval_unwrapping(strict):
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output

    wrap = HC.loglikelihood_result()
    r = wrap((-1.25, 1))
    assert isinstance(r, GenerationResult)
    assert unwrap_generation_output(r) == ((-1.25, True), None)
    # why: a bare tuple is turned into its str
    assert unwrap_generation_output((-1.25, True)) == ("(-1.25, True)", None)


def test_loglikelihood_result_missing_target_warns(monkeypatch):
    import lmms_eval.api.instance as inst

    monkeypatch.delattr(inst, "GenerationResult")
    with pytest.warns(HookWarning, match=r"lmms_eval\.api\.instance:GenerationResult is missing"):
        wrap = HC.loglikelihood_result()
    assert wrap((-2.0, 0)) == (-2.0, False)


# -- both harnesses: the run name ----------------------------------------------
@pytest.mark.parametrize(
    "module, install",
    [
        ("lmms_eval.loggers.evaluation_tracker", HC.install_lmms_run_name),
        ("lm_eval.loggers.evaluation_tracker", HC.install_lm_eval_run_name),
    ],
    ids=["lmms-eval", "lm-eval"],
)
def test_run_name_binds_and_renames(module, install, monkeypatch, strict):
    import importlib

    tracker_cls = importlib.import_module(module).GeneralConfigTracker
    current = tracker_cls.log_experiment_args  # unwrapped: an earlier test may have installed the hook
    monkeypatch.setattr(tracker_cls, "log_experiment_args", getattr(current, "__wrapped__", current))
    name = {"v": "org/base__ties-0123abcd"}
    assert install(lambda: name["v"]) is True
    t = tracker_cls()
    t.log_experiment_args(
        model_source="merged",
        model_args="pretrained=/x/base",
        system_instruction=None,
        chat_template=None,
        fewshot_as_multiturn=False,
    )
    assert t.model_name == "org/base__ties-0123abcd"
    assert t.model_name_sanitized == "org__base__ties-0123abcd"
    name["v"] = None  # no merged model loaded: the harness's own name stays
    t.log_experiment_args(
        model_source="hf",
        model_args="pretrained=/x/base",
        system_instruction=None,
        chat_template=None,
        fewshot_as_multiturn=False,
    )
    assert t.model_name == "/x/base"


def test_run_name_missing_target_warns(monkeypatch):
    from lm_eval.loggers.evaluation_tracker import GeneralConfigTracker

    monkeypatch.delattr(GeneralConfigTracker, "log_experiment_args")
    with pytest.warns(HookWarning, match=r"'lm-eval run name' did not bind.*lm-eval 0\.4\.13"):
        assert HC.install_lm_eval_run_name(lambda: "x") is False


# -- lm-eval: the registry -----------------------------------------------------
def test_lm_eval_register_keeps_the_builtins(strict):
    from lm_eval.api.registry import get_model

    from harness_merge.harness.lm_eval_model import MergedLM

    assert get_model("merged") is MergedLM
    assert get_model("hf").__name__ == "HFLM"
    assert HC.register_lm_eval_model("merged", MergedLM) is True  # again: same class, no error


def test_lm_eval_register_missing_target_warns(monkeypatch):
    import lm_eval.api.registry as reg

    monkeypatch.delattr(reg, "register_model")
    with pytest.warns(HookWarning, match=r"register_model is missing.*lm-eval-merged --model merged cannot"):
        assert HC.register_lm_eval_model("merged", object) is False


def test_lm_eval_register_name_taken(monkeypatch):
    import lm_eval.api.registry as reg

    from harness_merge.harness.lm_eval_model import MergedLM

    def taken_by(value):
        def register_model(*names):
            def deco(cls):
                raise ValueError(
                    f"'model' alias '{names[0]}' already registered (existing={value}, new={cls})"
                )

            return deco

        return register_model

    # a lazy entry point to MergedLM itself (lm-eval versions that read entry points): fine
    monkeypatch.setattr(reg, "register_model", taken_by("harness_merge.harness.lm_eval_model:MergedLM"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", HookWarning)
        assert HC.register_lm_eval_model("merged", MergedLM) is True
    monkeypatch.setattr(reg, "register_model", taken_by("other_pkg:Merged"))
    with pytest.warns(HookWarning, match=r"lm-eval model 'merged' is taken .*other_pkg:Merged"):
        assert HC.register_lm_eval_model("merged", MergedLM) is False


# -- transformers: the image-only processor -------------------------------------
def test_image_only_processor_binds_and_lets_none_through(strict):
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    cls = C.image_only_processor_class(Qwen2VLProcessor)
    assert issubclass(cls, Qwen2VLProcessor) and cls.__name__ == "Qwen2VLProcessorImageOnly"
    proc = cls.__new__(cls)  # the check needs no state
    # transformers' own check does not take None (without torchvision it fails
    # already looking up the video processor class; with it, None is no instance)
    with pytest.raises((TypeError, AttributeError)):
        ProcessorMixin.check_argument_for_proper_class(proc, "video_processor", None)
    assert proc.check_argument_for_proper_class("video_processor", None) is None
    with pytest.raises(TypeError, match="tokenizer"):  # other arguments are still checked
        proc.check_argument_for_proper_class("tokenizer", "not a tokenizer")


def test_hf_backend_builds_an_image_only_processor(tmp_path, strict):
    """The hf backend's fallback processor (no torchvision here) is built
    through the hook and processes an image."""
    from PIL import Image
    from transformers import AutoConfig, AutoTokenizer

    from harness_merge.backends import _common
    from harness_merge.demo.tiny import build_tiny_qwen2vl

    base = build_tiny_qwen2vl(tmp_path / "qwen2vl")
    proc = _common._image_only_processor(
        str(base), AutoConfig.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    )
    assert type(proc).__name__ == "Qwen2VLProcessorImageOnly"
    out = proc(
        text=["<|vision_start|><|image_pad|><|vision_end|>hi"],
        images=[Image.new("RGB", (56, 56))],
        return_tensors="pt",
    )
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_image_only_processor_missing_target_warns(monkeypatch):
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.delattr(ProcessorMixin, "check_argument_for_proper_class")
    with pytest.warns(HookWarning, match=r"'image-only processor' did not bind.*transformers 5\."):
        assert C.image_only_processor_class(Qwen2VLProcessor) is Qwen2VLProcessor


# -- lmms-eval's plugin registry and the import order ---------------------------
_REGISTRY_PROBE = """
import json, sys
sys.path.append({plugin_dir!r})  # after site-packages: its entry point loads after ours
{imports}
import lmms_eval.models as lm
print("IDS=" + json.dumps(lm.MODEL_REGISTRY_V2.list_canonical_model_ids()))
"""


@pytest.fixture(scope="module")
def other_plugin(tmp_path_factory) -> Path:
    """A second lmms-eval plugin, installed as a bare dist-info folder."""
    d = tmp_path_factory.mktemp("plugin")
    (d / "hm_other_plugin.py").write_text(
        "def manifest():\n"
        "    from lmms_eval.models.registry_v2 import ModelManifest\n"
        "    return ModelManifest(model_id='hm_other_model', simple_class_path='hm_other_plugin.M')\n"
    )
    info = d / "hm_other_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hm-other-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lmms_eval.models]\nhm_other_model = hm_other_plugin:manifest\n")
    return d


@pytest.mark.parametrize(
    "imports",
    [
        "import harness_merge.harness.lmms_model",  # our model first: lmms-eval builds its registry inside
        "import lmms_eval.models",
        "from harness_merge.harness.lmms_model import MergedLMM",
    ],
)
def test_import_order_keeps_every_plugin(imports, other_plugin):
    code = textwrap.dedent(_REGISTRY_PROBE).format(plugin_dir=str(other_plugin), imports=imports)
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=str(ROOT)
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Failed to load model entry-point manifests" not in p.stdout + p.stderr
    ids = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("IDS="))[4:])
    assert "merged" in ids and "hm_other_model" in ids and "qwen2_vl" in ids


def test_a_hook_warning_is_visible_under_the_harness_clis():
    """The harnesses' CLIs set warning filters of their own on import; a hook
    that does not bind is still printed on stderr there."""
    code = textwrap.dedent(
        """
        import lmms_eval.__main__, lm_eval.__main__, lmms_eval.evaluator as ev
        from harness_merge.harness import _compat
        del ev._redact_eval_config_secrets
        print("bound" if _compat.install_results_record(lambda: {}) else "not bound")
        """
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=str(ROOT)
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().endswith("not bound")
    assert "HookWarning: harness-merge hook 'config.merge in lmms-eval results' did not bind" in p.stderr
