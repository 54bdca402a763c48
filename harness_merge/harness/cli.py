"""``harness-merge``: merge | methods | demo | leaderboard | regress.

Thin: parses arguments, calls the API, prints. Errors of the user's input
(``MergeError``) print one clear line and exit 2; nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from ..errors import MergeError


def _parse_kv(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise MergeError(f"--param expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_merge(args) -> int:
    from ..api import MergeSpec, merge
    from ..recipe import Recipe, load_recipe, translate_param_names

    recipe = load_recipe(args.recipe) if args.recipe else Recipe(method=None, adapters=[])
    method = args.method or recipe.method
    params = dict(recipe.params)
    cli_params, notes = translate_param_names(str(method), _parse_kv(args.param))
    params.update(cli_params)
    adapters = args.adapters or recipe.adapters
    out = args.out or recipe.out
    if not adapters:
        raise MergeError(
            "no adapters: pass --adapters DIR [DIR ...] or a recipe with 'adapters:' (or mergekit's 'models:')"
        )
    if not method:
        raise MergeError("no method: pass --method NAME (see `harness-merge methods`)")
    if not out:
        raise MergeError("no output folder: pass --out DIR")
    if recipe.source == "mergekit":
        print(f"mergekit recipe -> method={method} params={params} base={recipe.base}", file=sys.stderr)
    for note in [*recipe.notes, *notes]:
        print(f"note: {note}", file=sys.stderr)
    spec = MergeSpec(
        adapters=tuple(adapters),
        method=method,
        params=params,
        base=args.base or recipe.base,
        format=args.format or recipe.format or "auto",
        rank=args.rank if args.rank is not None else recipe.rank,
        dtype=args.dtype or recipe.dtype,
    )
    art = merge(
        spec,
        out=out,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        progress=not args.quiet,
        force=args.force,
        content_hash=args.content_hash,
    )
    res = art.manifest.get("result", {})
    print(f"wrote {art.kind} artifact to {art.path}" + (" (cache hit)" if art.cache_hit else ""))
    details = [f"method={art.manifest['method']}", f"modules={res.get('modules')}"]
    if art.kind == "lora":
        details.append(f"rank={res.get('rank')}")
    if "svd_rel_error" in res:
        e = res["svd_rel_error"]
        details.append(f"svd_rel_error max={e['max']:.4g} mean={e['mean']:.4g}")
    print("  " + "  ".join(details))
    return 0


def cmd_merge_modalities(args) -> int:
    """Modality merging (:mod:`harness_merge.modality`): only the shared LLM is merged."""
    from ..modality import merge_modalities

    models = {}
    for it in args.modality:
        name, sep, path = it.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise MergeError(f"--modality expects NAME=DIR (e.g. vision=/m/llava), got {it!r}")
        if name.strip() in models:
            raise MergeError(f"--modality {name.strip()} is given twice")
        models[name.strip()] = path.strip()
    rec = merge_modalities(
        args.base, models, args.method, _parse_kv(args.param), out=args.out, progress=not args.quiet
    )
    print(f"wrote modality artifact to {args.out} ({rec['shared_tensors']} shared LLM tensors merged)")
    for name, m in rec["modalities"].items():
        print(
            f"  {name}: {args.out}/{name}  kept {m['kept_tensors']} tensors ({', '.join(m['kept_prefixes'])})"
        )
    return 0


def cmd_methods(args) -> int:
    from .. import methods

    for name in methods.available():
        spec = methods.get(name)
        print(f"{name:10s} {spec.summary}")
        print(
            f"{'':10s} inputs: {', '.join(sorted(spec.inputs))}; min adapters: {spec.min_inputs}; {spec.reference_url}"
        )
        hints = typing.get_type_hints(spec.params_cls)
        ps = []
        for f in dataclasses.fields(spec.params_cls):
            choices = (
                typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is typing.Literal else ()
            )
            ps.append(f"{f.name}={f.default!r}" + (f" ({'|'.join(map(str, choices))})" if choices else ""))
        print(f"{'':10s} params: {', '.join(ps)}")
        note = spec.params_cls.listing_note()
        if note:
            print(f"{'':10s} {note}")
        print()
    return 0


# Subcommands with their own parsers: everything after the name goes to them.
DELEGATES = {
    "demo": ("harness_merge.demo.run", "build the tiny offline example, merge it, evaluate it"),
    "leaderboard": ("harness_merge.leaderboard.runner", "run a methods x tasks grid"),
    "regress": ("harness_merge.leaderboard.regress", "compare results with a baseline, fail on drops"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness-merge", description="Merge fine-tuned adapters and evaluate the merge."
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("merge", help="merge adapters/checkpoints and write the artifact")
    m.add_argument(
        "recipe",
        nargs="?",
        help="YAML recipe: ours (method, adapters, parameters, base, out, format, "
        "rank) or mergekit's (merge_method, models, base_model, parameters)",
    )
    m.add_argument(
        "--adapters", nargs="+", metavar="DIR", help="PEFT LoRA folders or hub ids, or full checkpoints"
    )
    m.add_argument("--method", help="merge method (see `harness-merge methods`)")
    m.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="method parameter (repeatable); mergekit's density, lambda, weight are translated",
    )
    m.add_argument("--out", help="output folder")
    m.add_argument("--base", help="base model (needed for --format full and for full checkpoints)")
    m.add_argument("--format", choices=["auto", "lora", "full"])
    m.add_argument("--rank", type=int, help="write a LoRA truncated to this rank (SVD), printing the error")
    m.add_argument("--dtype", help="output dtype (default: the inputs')")
    m.add_argument("--cache-dir", help="merge cache (default $HARNESS_MERGE_CACHE or ~/.cache/harness_merge)")
    m.add_argument("--no-cache", action="store_true")
    m.add_argument(
        "--content-hash",
        choices=("xxh3_128", "sha256"),
        default=None,
        help="digest of the inputs and of the artifact's files (default $HARNESS_MERGE_HASH or xxh3_128)",
    )
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    m.add_argument(
        "--force",
        action="store_true",
        help="run a merge the cost pre-check refuses (estimated beyond $HARNESS_MERGE_MAX_SECONDS)",
    )
    m.set_defaults(func=cmd_merge)

    mm = sub.add_parser(
        "merge-modalities",
        help="merge the shared LLM of vision/audio/video-language models; each keeps its encoder and connector",
    )
    mm.add_argument("--base", required=True, help="the text LLM every modality model was fine-tuned from")
    mm.add_argument(
        "--modality",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a modality model (repeatable, two or more), e.g. vision=/m/llava audio=/m/qwen2audio",
    )
    mm.add_argument("--method", required=True, help="merge method (see `harness-merge methods`)")
    mm.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    mm.add_argument("--out", required=True, help="output folder: one servable model folder per modality")
    mm.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    mm.set_defaults(func=cmd_merge_modalities)

    ms = sub.add_parser("methods", help="list merge methods, their parameters and defaults")
    ms.set_defaults(func=cmd_methods)

    for name, (_, text) in DELEGATES.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATES:
        import importlib

        try:
            return int(importlib.import_module(DELEGATES[argv[0]][0]).main(argv[1:]) or 0)
        except (MergeError, OSError) as e:
            return _fail(e)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (MergeError, OSError) as e:
        return _fail(e)


def _fail(e: Exception) -> int:
    """One line, exit 2: a ``MergeError``, or an OS failure nothing caught earlier."""
    if isinstance(e, OSError):
        from ..artifact.fsio import os_error_text

        e = os_error_text(e)
    print(f"harness-merge: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
