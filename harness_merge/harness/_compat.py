"""Every hook of harness-merge into lmms-eval's and lm-eval's private names.

Each hook is a :class:`~harness_merge._compat.Hook` (target, package, the
versions it was checked against, what a run loses without it) bound through
:func:`harness_merge._compat.bind`: on a version or shape it was not written
for it warns (:class:`~harness_merge._compat.HookWarning`) instead of raising.

========================  ==========================================================  ==============
hook                      private name                                                checked on
========================  ==========================================================  ==============
``RESULTS_RECORD``        ``lmms_eval.evaluator._redact_eval_config_secrets``          lmms-eval 0.7.3
``EVALUATION_ERRORS``     ``lmms_eval.__main__.cli_evaluate_single``                   lmms-eval 0.7.3
``LOGLIKELIHOOD_RESULT``  ``lmms_eval.api.instance.GenerationResult``                  lmms-eval 0.7.3
``LMMS_RUN_NAME``         ``lmms_eval.loggers...GeneralConfigTracker.log_experiment_args``  lmms-eval 0.7.3
``LM_EVAL_RUN_NAME``      ``lm_eval.loggers...GeneralConfigTracker.log_experiment_args``    lm-eval 0.4.13
``LM_EVAL_REGISTER``      ``lm_eval.api.registry.register_model`` (+ built-ins first)  lm-eval 0.4.13
========================  ==========================================================  ==============

The transformers hook (``check_argument_for_proper_class``) is in
:mod:`harness_merge._compat`, below the backends that use it.
Nothing here imports a harness until a hook is installed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from .._compat import Hook, bind, patch, warn_hook

LMMS = "lmms-eval"
LMMS_CHECKED = "==0.7.3"
LM_EVAL = "lm-eval"
LM_EVAL_CHECKED = "==0.4.13"

RESULTS_RECORD = Hook(
    name="config.merge in lmms-eval results",
    package=LMMS,
    target="lmms_eval.evaluator:_redact_eval_config_secrets",
    checked=LMMS_CHECKED,
    params=("value",),
    lost="the results JSON has no config.merge (the merge record is still printed on stderr)",
)
EVALUATION_ERRORS = Hook(
    name="lmms-eval evaluation errors",
    package=LMMS,
    target="lmms_eval.__main__:cli_evaluate_single",
    checked=LMMS_CHECKED,
    params=("args",),
    lost=(
        "an evaluation that fails outside model 'merged' may leave exit status 0 "
        "(lmms-eval logs it and goes on; failures of model 'merged' still exit 1)"
    ),
)
LOGLIKELIHOOD_RESULT = Hook(
    name="lmms-eval loglikelihood results",
    package=LMMS,
    target="lmms_eval.api.instance:GenerationResult",
    checked=LMMS_CHECKED,
    params=("text", "token_counts"),
    lost="(logprob, is_greedy) tuples are returned bare; an lmms-eval that turns them into str breaks "
    "loglikelihood and multiple_choice tasks",
)
LMMS_RUN_NAME = Hook(
    name="lmms-eval run name",
    package=LMMS,
    target="lmms_eval.loggers.evaluation_tracker:GeneralConfigTracker.log_experiment_args",
    checked=LMMS_CHECKED,
    lost="results are named and filed by pretrained= (runs of different merges of one base share a folder)",
)
LM_EVAL_RUN_NAME = Hook(
    name="lm-eval run name",
    package=LM_EVAL,
    target="lm_eval.loggers.evaluation_tracker:GeneralConfigTracker.log_experiment_args",
    checked=LM_EVAL_CHECKED,
    lost=LMMS_RUN_NAME.lost,
)
LM_EVAL_REGISTER = Hook(
    name="lm-eval model registry",
    package=LM_EVAL,
    target="lm_eval.api.registry:register_model",
    checked=LM_EVAL_CHECKED,
    lost="model 'merged' is not registered: lm-eval-merged --model merged cannot find it",
)

HOOKS = (
    RESULTS_RECORD,
    EVALUATION_ERRORS,
    LOGLIKELIHOOD_RESULT,
    LMMS_RUN_NAME,
    LM_EVAL_RUN_NAME,
    LM_EVAL_REGISTER,
)


# -- lmms-eval ----------------------------------------------------------------
def install_results_record(get_record: Callable[[], dict | None]) -> bool:
    """Put ``get_record()`` under ``config["merge"]`` of lmms-eval's results.

    lmms-eval 0.7.3 builds ``results["config"]`` from the CLI's model_args and
    passes it through ``evaluator._redact_eval_config_secrets`` right before the
    results are returned and saved (it never reads the model's
    ``get_model_info``); the wrapper adds the record to that dict (the one with
    ``model_args`` and ``model_backend``), then redacts as before."""

    def make(orig):
        @functools.wraps(orig)
        def redact(value):
            record = get_record()
            if (
                record is not None
                and isinstance(value, dict)
                and "model_args" in value
                and "model_backend" in value
                and "merge" not in value
            ):
                value = {**value, "merge": record}
            return orig(value)

        return redact

    return patch(RESULTS_RECORD, make)


def watch_evaluations(on_error: Callable[[BaseException], None]) -> bool:
    """Call ``on_error(exc)`` when one evaluation of the lmms-eval CLI raises
    (``cli_evaluate`` logs it and goes on, exiting 0), then re-raise."""

    def make(orig):
        @functools.wraps(orig)
        def single(*args, **kwargs):
            try:
                return orig(*args, **kwargs)
            except Exception as e:
                on_error(e)
                raise

        return single

    return patch(EVALUATION_ERRORS, make)


def loglikelihood_result() -> Callable[[tuple[float, bool]], Any]:
    """A function wrapping a ``(logprob, is_greedy)`` result for lmms-eval.

    lmms-eval 0.7.3 passes every model output through
    ``api.instance.unwrap_generation_output``, which turns a tuple into its
    ``str()`` and breaks every loglikelihood / multiple_choice task; a
    ``GenerationResult`` is unwrapped as is, so the tuple reaches the task intact.
    Without ``GenerationResult`` the tuple is returned bare."""
    found = bind(LOGLIKELIHOOD_RESULT)
    if found is None:
        return lambda r: (float(r[0]), bool(r[1]))
    result_cls = found[2]
    return lambda r: result_cls(text=(float(r[0]), bool(r[1])))


def _install_run_name(hook: Hook, get_name: Callable[[], str | None]) -> bool:
    """Make a harness's ``GeneralConfigTracker`` name the run by ``get_name()``
    (``harness_merge.harness.run_id``) instead of the ``pretrained=`` it reads
    from the model_args string: the results' ``model_name`` and output folder."""
    module = hook.target.partition(":")[0]

    def make(orig):
        @functools.wraps(orig)
        def log_experiment_args(self, *args, **kwargs):
            orig(self, *args, **kwargs)
            name = get_name()
            if name:
                mod = __import__(module, fromlist=["sanitize_model_name"])
                sanitize = getattr(mod, "sanitize_model_name", lambda x: x.replace("/", "__"))
                self.model_name = name
                self.model_name_sanitized = sanitize(name)

        return log_experiment_args

    return patch(hook, make)


def install_lmms_run_name(get_name: Callable[[], str | None]) -> bool:
    return _install_run_name(LMMS_RUN_NAME, get_name)


# -- lm-eval ------------------------------------------------------------------
def install_lm_eval_run_name(get_name: Callable[[], str | None]) -> bool:
    return _install_run_name(LM_EVAL_RUN_NAME, get_name)


def register_lm_eval_model(name: str, cls: type) -> bool:
    """Register ``cls`` as lm-eval model ``name`` without hiding the built-ins.

    lm-eval 0.4.13's ``get_model`` imports ``lm_eval.models`` (which registers
    ``hf``, ``vllm``, ...) only while its registry is empty: registering
    ``merged`` first would leave it the only model. So the built-ins are
    imported first, then ``cls`` is registered."""
    import lm_eval.models  # noqa: F401  (the built-ins, before the registry is non-empty)

    found = bind(LM_EVAL_REGISTER)
    if found is None:
        return False
    try:
        found[2](name)(cls)
    except ValueError as e:  # the name is taken
        if f"{cls.__module__}:{cls.__name__}" in str(e):
            return True  # by a lazy entry point to this very class (lm-eval versions that read entry points)
        warn_hook(
            f"harness-merge hook {LM_EVAL_REGISTER.name!r}: lm-eval model {name!r} is taken ({e}); {cls} is not registered"
        )
        return False
    return True


__all__ = [
    "EVALUATION_ERRORS",
    "HOOKS",
    "LMMS_RUN_NAME",
    "LM_EVAL_REGISTER",
    "LM_EVAL_RUN_NAME",
    "LOGLIKELIHOOD_RESULT",
    "RESULTS_RECORD",
    "install_lm_eval_run_name",
    "install_lmms_run_name",
    "install_results_record",
    "loglikelihood_result",
    "register_lm_eval_model",
    "watch_evaluations",
]
