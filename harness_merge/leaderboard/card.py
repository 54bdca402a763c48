"""Model card of a merged leaderboard row: ``README.md`` in the Hugging Face model-card format.

YAML front matter (``base_model``, ``library_name``, ``tags``, ``model-index``
with one result per task) and a body with the base, the adapters with their
sha256, the method and its parameters, the scores with stderr and n, and the
exact ``lmms_eval`` command that reproduces the row. Written by the runner
into ``OUT/rows/<row>/`` next to that row's lmms-eval results; the merged
artifact itself stays in the content-addressed merge cache (its path is in
the card), so the cache folder is never changed after it is published.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from ..artifact import fsio


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def card_text(*, row, grid, cells: list[dict], record: dict, command: str) -> str:
    m = record.get("manifest") or {}
    art = record.get("artifact") or {}
    adapters = m.get("adapters") or [{"ref": a} for a in row.adapters]
    algo = m.get("content_hash", "sha256")  # the manifest names its digests' algorithm
    names = {v: k for k, v in grid.adapters.items()}
    results = []
    for c in cells:
        if c.get("value") is None:
            continue
        metric = {
            "type": c["metric"].split(",")[0],
            "name": c["metric"],
            "value": round(float(c["value"]), 4),
        }
        if c.get("stderr") is not None:
            metric["stderr"] = round(float(c["stderr"]), 4)
        results.append(
            {
                "task": {"type": "lmms-eval", "name": c["task"]},
                "dataset": {"type": c["task"], "name": c["task"], "split": "test"},
                "metrics": [metric],
                "source": {"name": "harness-merge leaderboard (lmms-eval)", "url": "local"},
            }
        )
    front = {
        "base_model": str(grid.written.get("base", grid.base)),
        "library_name": "peft" if art.get("kind") == "lora" else "transformers",
        "tags": ["merge", "harness-merge", str(row.method), "lmms-eval"],
        "model-index": [{"name": f"{grid.name}: {row.label}", "results": results}],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {row.label}",
        "",
        (
            f"A merge of {len(adapters)} adapter(s) onto `{front['base_model']}` by **{row.method}**, "
            f"written by harness-merge {m.get('harness_merge_version', '?')} (leaderboard grid `{grid.name}`)."
        ),
        "",
        "## Inputs",
        "",
        f"- base: `{front['base_model']}`"
        + (f" ({algo} `{(m.get('base') or {}).get(algo)}`)" if (m.get("base") or {}).get(algo) else ""),
        "",
        f"| adapter | path | {algo} |",
        "|---|---|---|",
    ]
    for a in adapters:
        ref = str(a.get("ref"))
        lines.append(
            f"| {names.get(ref, os.path.basename(ref.rstrip('/')))} | `{ref}` | `{a.get(algo) or '-'}` |"
        )
    params = m.get("params", row.params)
    lines += [
        "",
        "## Method",
        "",
        f"- method: `{m.get('method', row.method)}`"
        + (f" ({m['reference_url']})" if m.get("reference_url") else ""),
        f"- parameters (every field, defaults included): `{json.dumps(params, sort_keys=True)}`",
        f"- parameters set in the grid: `{json.dumps(row.params, sort_keys=True)}`",
        f"- artifact: {art.get('kind', '?')} at `{art.get('path', '?')}` (merge cache)",
        f"- code version: `{m.get('code_version', '?')}`",
        "",
        "## Scores",
        "",
        "| task | metric | value | stderr | n |",
        "|---|---|---|---|---|",
    ]
    for c in cells:
        lines.append(
            f"| {c['task']} | {c['metric']} | {_fmt(c.get('value'))} | {_fmt(c.get('stderr'))} | "
            f"{c.get('n') if c.get('n') is not None else '-'} |"
        )
    lines += [
        "",
        "stderr: the standard error of the mean over the task's docs (lmms-eval's).",
        "",
        "## Reproduce",
        "",
        "From the folder the grid was run in (the merge is rebuilt, or found in the cache, on load):",
        "",
        "```",
        command,
        "```",
        "",
    ]
    return "\n".join(lines)


def write_card(path: Path, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return fsio.atomic_write_text(path, card_text(**kw))
