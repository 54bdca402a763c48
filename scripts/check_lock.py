"""Check that the running environment holds exactly what a lock file pins.

    python scripts/check_lock.py requirements/main.lock

Exit 0 when every pinned package is installed at its pinned version and nothing
else is installed (the project itself and pip, the venv's seed, excepted);
exit 1 with one line per difference otherwise. Packages the lock lists as
excluded (``# name`` under "The following packages were excluded") must be
absent. Standard library only, so it runs in any venv.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

PROJECT = "harness-merge"
SEEDS = {"pip"}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)")


def normalise(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> tuple[dict[str, str], set[str]]:
    """(pins, excluded) of a ``uv pip compile`` lock file."""
    pins: dict[str, str] = {}
    excluded: set[str] = set()
    in_excluded = False
    for line in path.read_text().splitlines():
        if line.startswith("# The following packages were excluded"):
            in_excluded = True
            continue
        if in_excluded and line.startswith("# ") and " " not in line[2:].strip():
            excluded.add(normalise(line[2:].strip()))
            continue
        m = _PIN.match(line)
        if m:
            pins[normalise(m.group(1))] = m.group(2)
    if not pins:
        raise SystemExit(f"check_lock: {path} holds no 'name==version' pins")
    return pins, excluded


def installed() -> dict[str, str]:
    return {normalise(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def differences(pins: dict[str, str], excluded: set[str], have: dict[str, str]) -> list[str]:
    out = []
    for name, want in sorted(pins.items()):
        got = have.get(name)
        if got is None:
            out.append(f"missing: {name}=={want}")
        elif got != want:
            out.append(f"version: {name} is {got}, the lock pins {want}")
    for name in sorted(set(have) - set(pins) - SEEDS - {PROJECT}):
        why = "excluded by the lock" if name in excluded else "not in the lock"
        out.append(f"extra: {name}=={have[name]} ({why})")
    if PROJECT not in have:
        out.append(f"missing: {PROJECT} (the project itself, editable)")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    lock = Path(argv[0])
    if not lock.is_file():
        print(f"check_lock: no lock file at {lock}", file=sys.stderr)
        return 2
    pins, excluded = read_lock(lock)
    diff = differences(pins, excluded, installed())
    for line in diff:
        print(f"check_lock: {lock}: {line}", file=sys.stderr)
    if not diff:
        print(f"[lock] the environment matches {lock} ({len(pins)} pins)")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
