"""Hooks into other packages' private names, and the rule they follow.

harness-merge relies on a few names that lmms-eval, lm-eval and transformers do
not promise to keep. Every such use goes through :func:`bind`: it looks the name
up, checks that it still has the shape the hook was written for (a callable with
these parameters, a class with this field) and that the installed version is one
the hook was checked against. On a checked version that binds, nothing is said.
Otherwise a :class:`HookWarning` names the hook, the private name, the package
and its version and what the run loses; the run goes on without the hook (or,
on an unchecked version whose target still has the right shape, with it). A
hook never raises ``AttributeError`` into a run.

This module sits below ``backends/`` (it imports nothing but the standard
library), so a backend may use it; the transformers hook lives here. The
harness hooks (lmms-eval, lm-eval) are in :mod:`harness_merge.harness._compat`,
which builds on :func:`bind`.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from dataclasses import dataclass
from typing import Any


class HookWarning(UserWarning):
    """A harness-merge hook into another package's private name did not bind
    (or bound on a version it was not checked against)."""


@dataclass(frozen=True)
class Hook:
    """One hook: ``target`` (``"module:attr"`` or ``"module:Class.attr"``) in the
    distribution ``package``, checked on the versions ``checked``
    (``"==0.7.3"`` or ``">=5.16.1,<5.20"``); ``params``, when given, the
    parameter names the target must have (``self`` excluded), in order;
    ``lost`` says what the run loses when the hook does not bind."""

    name: str
    package: str
    target: str
    checked: str
    lost: str
    params: tuple[str, ...] | None = None


def installed_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _release(v: str) -> tuple[int, ...]:
    m = re.match(r"\d+(\.\d+)*", v.strip())
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def _cmp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


def version_checked(version: str | None, spec: str) -> bool:
    """Whether ``version`` satisfies ``spec``: comma-separated clauses of
    ``==``, ``>=``, ``<=``, ``<``, ``>`` on release numbers (pre/post/local parts
    are ignored: ``5.19.0.dev0`` counts as ``5.19.0``)."""
    if version is None:
        return False
    v = _release(version)
    ops = {
        "==": lambda c: c == 0,
        ">=": lambda c: c >= 0,
        "<=": lambda c: c <= 0,
        ">": lambda c: c > 0,
        "<": lambda c: c < 0,
    }
    for clause in spec.split(","):
        m = re.fullmatch(r"\s*(==|>=|<=|>|<)\s*([0-9][0-9.]*)\s*", clause)
        if not m:
            raise ValueError(f"harness_merge._compat: bad version clause {clause!r} in {spec!r}")
        if not ops[m.group(1)](_cmp(v, _release(m.group(2)))):
            return False
    return True


def warn_hook(message: str) -> None:
    """``warnings.warn(message, HookWarning)``, shown even where an import has set
    a blanket ``warnings.filterwarnings("ignore")`` (lmms-eval's model modules
    do): a hook that does not bind is never silent. An ``error`` filter for it
    (``-W error::...HookWarning``) still turns it into an exception."""
    for action, msg, category, module, _ in warnings.filters:
        if msg is None and module is None and issubclass(HookWarning, category):
            if action == "error":
                warnings.warn(message, HookWarning, stacklevel=3)
                return
            break
    with warnings.catch_warnings():
        warnings.simplefilter("always", HookWarning)
        warnings.warn(message, HookWarning, stacklevel=3)


def _warn(hook: Hook, version: str | None, why: str) -> None:
    warn_hook(
        f"harness-merge hook {hook.name!r} did not bind: {why} "
        f"({hook.package} {version or 'not installed'}; the hook was checked against "
        f"{hook.package}{hook.checked}); {hook.lost}"
    )


def _lookup(target: str) -> tuple[Any, str, Any]:
    """``(owner, attr, value)`` of ``"module:a.b.attr"``; raises on a missing name."""
    mod_name, _, dotted = target.partition(":")
    owner: Any = importlib.import_module(mod_name)
    *path, attr = dotted.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attr, getattr(owner, attr)


def _param_names(obj: Any) -> tuple[str, ...] | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    names = tuple(p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return names[1:] if names[:1] == ("self",) else names


def bind(hook: Hook) -> tuple[Any, str, Any] | None:
    """``(owner, attr, value)`` of the hook's target, or ``None`` with a
    :class:`HookWarning` when it is missing or has another shape. On a version
    outside ``hook.checked`` a target of the right shape is still returned,
    with a warning that the hook is unverified there."""
    version = installed_version(hook.package)
    try:
        found = _lookup(hook.target)
    except (ImportError, AttributeError) as e:
        _warn(hook, version, f"{hook.target} is missing ({type(e).__name__}: {e})")
        return None
    value = found[2]
    if hook.params is not None:
        got = _param_names(value)
        if got != hook.params:
            _warn(
                hook,
                version,
                f"{hook.target} has parameters {got}, the hook expects {hook.params}",
            )
            return None
    if not version_checked(version, hook.checked):
        warn_hook(
            f"harness-merge hook {hook.name!r} bound to {hook.target} on {hook.package} {version}, "
            f"a version it was not checked against ({hook.package}{hook.checked}); if results look "
            f"wrong: {hook.lost}"
        )
    return found


def patch(hook: Hook, make_wrapper) -> bool:
    """Replace the hook's target by ``make_wrapper(original)`` once (a second
    call finds the wrapper, marked ``_harness_merge``, and does nothing).
    Returns whether the wrapper is in place."""
    found = bind(hook)
    if found is None:
        return False
    owner, attr, orig = found
    if getattr(orig, "_harness_merge", False):
        return True
    wrapper = make_wrapper(orig)
    wrapper._harness_merge = True
    setattr(owner, attr, wrapper)
    return True


# ---------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------
PROCESSOR_ARGUMENT_CHECK = Hook(
    name="image-only processor",
    package="transformers",
    target="transformers.processing_utils:ProcessorMixin.check_argument_for_proper_class",
    checked=">=5.16.1,<5.20",
    params=("argument_name", "argument"),
    lost=(
        "a multimodal processor is built without overriding its argument check, so one whose video "
        "processor needs torchvision may fail to build (install torchvision)"
    ),
)


def image_only_processor_class(proc_cls: type) -> type:
    """``proc_cls`` (a transformers ``ProcessorMixin`` subclass) taking
    ``video_processor=None``: transformers' ``check_argument_for_proper_class``
    rejects ``None`` for a declared sub-processor, so the subclass lets ``None``
    through and checks every other argument as transformers does. When the
    method is gone or changed, ``proc_cls`` itself (with a :class:`HookWarning`)."""
    if bind(PROCESSOR_ARGUMENT_CHECK) is None:
        return proc_cls

    class _ImageOnly(proc_cls):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    _ImageOnly.__name__ = f"{proc_cls.__name__}ImageOnly"
    _ImageOnly.__qualname__ = _ImageOnly.__name__
    return _ImageOnly


__all__ = [
    "PROCESSOR_ARGUMENT_CHECK",
    "Hook",
    "HookWarning",
    "bind",
    "image_only_processor_class",
    "installed_version",
    "warn_hook",
    "patch",
    "version_checked",
]
