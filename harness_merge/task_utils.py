"""Scoring helpers shared by the task configs in ``task_configs/`` (their
``utils.py`` files import from here; lmms-eval loads those from their folders)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping


def box_iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes (0 when the union is empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (
        max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    )
    return inter / union if union > 0 else 0.0


def sync_generated(files: Mapping[str, bytes], out: Path, *, check: bool) -> int:
    """Write generated task files under ``out`` where their bytes differ (or,
    with ``check``, only report them). Prints what changed; returns 1 when a
    check found a difference, else 0."""
    changed = []
    for rel, data in files.items():
        path = Path(out) / rel
        if path.exists() and path.read_bytes() == data:
            continue
        changed.append(rel)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    print(f"{len(changed)} file(s) {'would change' if check else 'written'}: {', '.join(changed) or '-'}")
    return 1 if (check and changed) else 0
