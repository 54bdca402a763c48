"""Merge recipes: our own YAML schema and mergekit's, both read into one
:class:`Recipe` (what ``harness-merge merge recipe.yaml`` runs).

Our schema::

    method: copa
    adapters: [ad/sqa, ad/vqa]
    parameters: {prune_rate: 0.8}
    out: merged            # base, format, rank, dtype optional

mergekit's schema (the methods both tools have)::

    merge_method: ties     # linear | task_arithmetic | ties | dare_linear | dare_ties
    base_model: path/base
    models:
      - model: path/ft1            # a full checkpoint, or base+path/lora for a LoRA
        parameters: {density: 0.5, weight: 1.0}
    parameters: {normalize: true, lambda: 1.0}
    dtype: float32

mergekit's names map to ours: ``linear -> wa``, ``task_arithmetic -> ta``,
``dare_linear -> dare``; ``density -> prune_rate = 1 - density`` (ties) or
``drop_rate = 1 - density`` (dare); ``weight`` (per model) -> ``weights``;
``lambda -> scaling``; ``normalize`` divides the weights by their sum (ta,
dare) or is TIES' own disjoint mean (ties). Where the two tools' conventions
differ, :attr:`Recipe.notes` says how (TIES with unequal weights, DARE's
rescale, random masks, embeddings and norms); the CLI prints them.

Relative paths resolve against the recipe's folder when they exist there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import MergeError

OWN_KEYS = ("method", "adapters", "parameters", "base", "out", "format", "rank", "dtype")

#: mergekit method -> ours.
MERGEKIT_METHODS = {
    "linear": "wa",
    "task_arithmetic": "ta",
    "ties": "ties",
    "dare_linear": "dare",
    "dare_ties": "dare_ties",
}
#: mergekit's defaults that differ by method (mergekit/merge_methods/registry.py, 0.1.5).
_NORMALIZE_DEFAULT = {
    "linear": True,
    "task_arithmetic": False,
    "ties": True,
    "dare_linear": False,
    "dare_ties": False,
}
_RESCALE_DEFAULT = {"dare_linear": True, "dare_ties": True}
_MODEL_PARAMS = {"weight", "density"}
_GLOBAL_PARAMS = {"weight", "density", "normalize", "lambda", "rescale", "int8_mask"}
# Top-level mergekit keys we accept; the rest (slices, modules, tokenizer, ...) are refused by name.
_MERGEKIT_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "name",
}

NOTE_EMBEDDINGS = (
    "embeddings, lm_head and 1-D tensors (norms, biases): mergekit applies the method (and lambda) to them; "
    "harness-merge gives them the plain average of the task vectors (the same for every method)"
)


class RecipeError(MergeError):
    """A recipe file is malformed or asks for what cannot be translated."""


@dataclass
class Recipe:
    method: str
    adapters: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    base: str | None = None
    out: str | None = None
    format: str | None = None
    rank: int | None = None
    dtype: str | None = None
    source: str = "harness-merge"  # or "mergekit"
    notes: list[str] = field(default_factory=list)


def load_recipe(path: str | Path) -> Recipe:
    """Read ``path``: mergekit's schema when it has ``merge_method``, else ours."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: cannot read recipe ({e})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    if "merge_method" in data:
        return from_mergekit(data, path)
    return _from_own(data, path)


def _rel(p: Any, root: Path) -> str:
    """A path relative to the recipe's folder if it exists there; else as given
    (a cwd-relative path or a hub id)."""
    q = Path(str(p)).expanduser()
    return str(root / q) if not q.is_absolute() and (root / q).exists() else str(p)


def _from_own(data: dict, path: Path) -> Recipe:
    unknown = set(data) - set(OWN_KEYS)
    if unknown:
        raise RecipeError(
            f"{path}: unknown recipe key(s) {sorted(unknown)}; known: {sorted(OWN_KEYS)} "
            f"(or mergekit's schema, with 'merge_method')"
        )
    root = path.parent
    ads = data.get("adapters") or []
    if isinstance(ads, str):
        ads = [ads]
    if not isinstance(ads, list):
        raise RecipeError(f"{path}: 'adapters' must be a path or a list of paths, got {type(ads).__name__}")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise RecipeError(f"{path}: 'parameters' must be a mapping, got {type(params).__name__}")
    out = data.get("out")
    if out is not None:
        q = Path(str(out)).expanduser()
        out = str(q if q.is_absolute() else root / q)
    base = data.get("base")
    return Recipe(
        method=data.get("method"),
        adapters=[_rel(a, root) for a in ads],
        params={k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in params.items()},
        base=_rel(base, root) if base is not None else None,
        out=out,
        format=data.get("format"),
        rank=data.get("rank"),
        dtype=data.get("dtype"),
    )


def _checked_params(
    path, label: str, params: dict, known, known_label: str, *, where: str | None = None
) -> dict:
    """``params`` with every name in ``known`` and every value a scalar (``_scalar``)."""
    bad = set(params) - known
    if bad:
        raise RecipeError(
            f"{path}: {label}: unknown mergekit parameter(s) {sorted(bad)}{known_label}: {sorted(known)}"
        )
    return {k: _scalar(path, where or label, k, v) for k, v in params.items()}


def _scalar(path: Path, where: str, key: str, value: Any) -> Any:
    if isinstance(value, (list, dict)):
        raise RecipeError(
            f"{path}: {where} parameter {key!r}: per-layer gradients and filtered values "
            f"(mergekit lists / conditionals) are not supported; give one number, got {value!r}"
        )
    return value


def from_mergekit(data: dict, path: Path) -> Recipe:
    """Translate a mergekit configuration (see the module docstring)."""
    unknown = set(data) - _MERGEKIT_KEYS
    if unknown:
        raise RecipeError(
            f"{path}: mergekit key(s) {sorted(unknown)} are not supported by harness-merge "
            f"(supported: {sorted(_MERGEKIT_KEYS)})"
        )
    mk = str(data["merge_method"])
    if mk not in MERGEKIT_METHODS:
        raise RecipeError(
            f"{path}: merge_method {mk!r} has no harness-merge equivalent; supported mergekit methods: "
            f"{', '.join(MERGEKIT_METHODS)} (for the others use harness-merge's own methods: `harness-merge methods`)"
        )
    method = MERGEKIT_METHODS[mk]
    root = path.parent
    glob = data.get("parameters") or {}
    if not isinstance(glob, dict):
        raise RecipeError(f"{path}: 'parameters' must be a mapping, got {type(glob).__name__}")
    glob = _checked_params(path, "parameters", glob, _GLOBAL_PARAMS, f" for {mk}; known")
    notes: list[str] = []

    base_raw = data.get("base_model")
    models = data.get("models")
    if isinstance(models, (str, dict)):
        models = [models]
    if not isinstance(models, list) or not models:
        raise RecipeError(
            f"{path}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}}"
        )
    adapters, weights, densities, lora_bases = [], [], [], set()
    for i, entry in enumerate(models):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise RecipeError(
                f"{path}: models[{i}] must be a path or {{model: PATH, parameters: {{...}}}}, got {entry!r}"
            )
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise RecipeError(f"{path}: models[{i}]: unknown key(s) {sorted(extra)}")
        ref = str(entry["model"])
        if base_raw is not None and ref == str(base_raw) and mk != "linear":
            continue  # the base model may appear in the list; it carries no task vector
        # (linear averages every listed model, the base included when listed.)
        mp = entry.get("parameters") or {}
        if not isinstance(mp, dict):
            raise RecipeError(f"{path}: models[{i}].parameters must be a mapping")
        mp = _checked_params(
            path, f"models[{i}] ({ref})", mp, _MODEL_PARAMS, "; per-model parameters", where=f"models[{i}]"
        )
        if "+" in ref and not Path(ref).exists():  # mergekit's base+lora syntax
            b, lora = ref.split("+", 1)
            lora_bases.add(b)
            ref = lora
        adapters.append(_rel(ref, root))
        weights.append(float(mp.get("weight", glob.get("weight", 1.0))))
        densities.append(float(mp.get("density", glob.get("density", 1.0))))
        if "weight" not in mp and "weight" not in glob and mk != "linear":
            notes.append(f"{ref}: no weight given; using 1.0 (mergekit requires one)")
    if not adapters:
        raise RecipeError(f"{path}: 'models' lists only the base model; nothing to merge")
    if len(lora_bases) > 1:
        raise RecipeError(f"{path}: LoRA models on different bases {sorted(lora_bases)}")
    base = base_raw if base_raw is not None else (next(iter(lora_bases)) if lora_bases else None)
    if base is None:
        if mk != "linear":
            raise RecipeError(
                f"{path}: merge_method {mk} needs 'base_model' (task vectors are taken against it)"
            )
        # linear: sum_i w_i theta_i / sum_i w_i = theta_1 + weighted mean of (theta_i - theta_1), any base works.
        base = str(models[0]["model"] if isinstance(models[0], dict) else models[0])
        notes.append(
            f"linear without base_model: task vectors taken against the first model ({base}); "
            f"the weighted mean of the models is the same"
        )
    base = _rel(base, root)

    normalize = bool(glob.get("normalize", _NORMALIZE_DEFAULT[mk]))
    lam = float(glob.get("lambda", 1.0))
    if bool(glob.get("int8_mask", False)):
        notes.append("int8_mask only changes mergekit's memory use; ignored")
    params: dict[str, Any] = {"scaling": lam}
    uniform = len(set(weights)) == 1

    if mk == "linear":
        if not normalize and abs(sum(weights) - 1.0) > 1e-6:
            raise RecipeError(
                f"{path}: linear with normalize: false and weights summing to {sum(weights):g} is "
                f"not a merge of task vectors; use normalize: true or weights summing to 1"
            )
        if lam != 1.0:
            notes.append(
                "linear: mergekit has no lambda for linear; harness-merge scales the averaged task vector"
            )
        params["weights"] = weights
    elif mk in ("task_arithmetic", "dare_linear"):
        params["weights"] = [w / sum(weights) for w in weights] if normalize else weights
    else:  # ties, dare_ties: our disjoint mean is peft's (sign on unweighted deltas, count denominator)
        if uniform and normalize:
            notes.append(
                f"{mk}: equal weights with normalize: true is harness-merge's (peft's) TIES; "
                f"the weight cancels"
            )
        else:
            mean = sum(weights) / len(weights)
            params["weights"] = [w / mean for w in weights]
            notes.append(
                f"{mk}: mergekit elects the sign on the weighted deltas and divides by "
                + ("the sum of the agreeing weights" if normalize else "nothing (normalize: false)")
                + "; harness-merge (as peft) elects on the unweighted trimmed deltas and divides by the count of "
                f"agreeing entries: results differ; weights passed as {[round(w / mean, 6) for w in weights]}"
            )
    if mk in ("ties", "dare_linear", "dare_ties"):
        if len(set(densities)) > 1:
            raise RecipeError(
                f"{path}: {mk}: per-model densities {densities} differ; harness-merge uses one "
                f"density for every model"
            )
        key = "prune_rate" if mk == "ties" else "drop_rate"
        params[key] = 1.0 - densities[0]
    elif any(d != 1.0 for d in densities):
        raise RecipeError(f"{path}: density applies to ties / dare_* only, not to {mk}")
    if mk in ("dare_linear", "dare_ties"):
        rescale = bool(glob.get("rescale", _RESCALE_DEFAULT[mk]))
        params["rescale"] = rescale
        if rescale:
            notes.append(
                f"{mk}: mergekit rescales the kept entries by the L1 ratio ||delta||_1 / ||kept||_1; "
                f"harness-merge by 1/(1 - drop_rate) (the DARE paper)"
            )
        notes.append(
            f"{mk}: random masks come from harness-merge's generator (seed, module), not mergekit's: "
            f"results agree in distribution only"
        )
        if mk == "dare_ties" and not normalize:
            notes.append(
                "dare_ties: normalize: false in mergekit sums the agreeing entries; harness-merge "
                "averages them (peft's dare_ties)"
            )
    elif "rescale" in glob:
        raise RecipeError(f"{path}: rescale applies to dare_linear / dare_ties only, not to {mk}")
    notes.append(NOTE_EMBEDDINGS)
    src = data.get("tokenizer_source")
    if src not in (None, "base"):
        raise RecipeError(
            f"{path}: tokenizer_source {src!r}: harness-merge copies the base model's tokenizer only"
        )
    dtype = data.get("out_dtype") or data.get("dtype")
    return Recipe(
        method=method,
        adapters=adapters,
        params=params,
        base=base,
        dtype=dtype,
        source="mergekit",
        notes=notes,
    )


def translate_param_names(method: str, params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Accept mergekit's names in ``--param``: ``density`` (ties: prune_rate = 1 -
    density; dare, dare_ties: drop_rate = 1 - density), ``lambda`` (scaling),
    ``weight`` (weights). Returns the translated params and one note per name."""
    out, notes = dict(params), []
    if "density" in out:
        target = {"ties": "prune_rate", "dare": "drop_rate", "dare_ties": "drop_rate"}.get(method)
        if target is None:
            raise RecipeError(
                f"{method}: mergekit's 'density' has no equivalent here (it maps to ties' prune_rate "
                f"and dare's drop_rate); see `harness-merge methods`"
            )
        raw = out.pop("density")
        try:
            d = float(raw)
        except (TypeError, ValueError):
            raise RecipeError(f"{method}: density must be a number, got {raw!r}") from None
        if target in out:
            raise RecipeError(f"{method}: both density and {target} given")
        out[target] = 1.0 - d
        notes.append(f"density={raw} (mergekit) -> {target}={1.0 - d:g}")
    for theirs, ours in (("lambda", "scaling"), ("weight", "weights")):
        if theirs in out:
            if ours in out:
                raise RecipeError(f"{method}: both {theirs} and {ours} given")
            out[ours] = out.pop(theirs)
            notes.append(f"{theirs} (mergekit) -> {ours}")
    return out, notes
