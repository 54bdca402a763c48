"""Write the mini-benchmark's local lmms-eval tasks into ``task_configs/minibench/`` (deterministic).

::

    python -m harness_merge.minibench.tasks            # write parquet + YAML
    python -m harness_merge.minibench.tasks --check    # exit 1 if a file would change

One task ``mb_<name>`` per task of :mod:`harness_merge.minibench.data`
(``EVAL_DOCS`` rows each, seed ``EVAL_SEED``: the rows the build script checks
in-process), metric ``score`` (0-100, exact match), and the groups ``mb_seen``
and ``mb_unseen`` (mean of their tasks' ``score``).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from harness_merge.minibench import data as mdata
from harness_merge.minibench.build import EVAL_DOCS, EVAL_SEED

REPO = Path(__file__).resolve().parents[2]
TASKS_DIR = REPO / "task_configs" / "minibench"
MAX_NEW_TOKENS = 16  # "yellow triangle" is 15 byte-level tokens

TEMPLATE = f"""# Shared settings of the minibench tasks (harness_merge.minibench.tasks writes this folder).
dataset_path: parquet
test_split: test
output_type: generate_until
doc_to_visual: !function utils.mb_doc_to_visual
doc_to_text: !function utils.mb_doc_to_text
doc_to_target: "answer"
process_results: !function utils.mb_process_results
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  temperature: 0
  do_sample: false
  num_beams: 1
metric_list:
  - metric: score
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

UTILS = '''"""The minibench tasks (harness_merge.minibench.data): prompt and exact-match score 0-100."""

from harness_merge.minibench.data import prompt, score


def mb_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def mb_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return prompt(doc)


def mb_process_results(doc, results):
    return {"score": score(results[0] if results else "", doc["answer"])}
'''


def task_name(task: str) -> str:
    return f"mb_{task}"


def task_yaml(task: str) -> str:
    t = mdata.TASKS[task]
    kind = "seen: an expert trains on it" if t.seen else "unseen: no expert trains on it"
    return (
        f"# minibench task '{task}' ({kind}); question {t.question!r}.\n"
        f"# Written by harness_merge.minibench.tasks.\n"
        f"task: {task_name(task)}\ninclude: _mb_template_yaml\n"
        f"dataset_kwargs:\n  data_files:\n    test: {task_name(task)}.parquet\n"
    )


def group_yaml(group: str, tasks) -> str:
    body = "".join(f"  - {task_name(t)}\n" for t in tasks)
    return (
        f"group: {group}\ntask:\n{body}aggregate_metric_list:\n  - metric: score\n    aggregation: mean\n"
        f"    weight_by_size: false\nmetadata:\n  version: 0.0\n"
    )


def parquet_bytes(task: str, n: int = EVAL_DOCS) -> bytes:
    import pyarrow.parquet as pq
    from datasets import Dataset, Features, Image, Value

    s = Value("string")
    rows = [
        {**r, "image": mdata.ddata.to_hf_image(r["image"])} for r in mdata.make_rows(task, n, seed=EVAL_SEED)
    ]
    ds = Dataset.from_list(
        rows, features=Features({"question_id": s, "question": s, "answer": s, "image": Image()})
    )
    buf = io.BytesIO()
    pq.write_table(ds.data.table, buf, compression="zstd", write_statistics=False, store_schema=True)
    return buf.getvalue()


def files() -> dict[str, bytes]:
    out = {
        "_mb_template_yaml": TEMPLATE.encode(),
        "utils.py": UTILS.encode(),
        "_mb_seen.yaml": group_yaml("mb_seen", mdata.SEEN).encode(),
        "_mb_unseen.yaml": group_yaml("mb_unseen", mdata.UNSEEN).encode(),
    }
    for task in mdata.TASKS:
        out[f"{task_name(task)}.yaml"] = task_yaml(task).encode()
        out[f"{task_name(task)}.parquet"] = parquet_bytes(task)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m harness_merge.minibench.tasks", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    ap.add_argument("--out", type=Path, default=TASKS_DIR)
    args = ap.parse_args(argv)
    from ..task_utils import sync_generated

    return sync_generated(files(), args.out, check=args.check)


if __name__ == "__main__":
    raise SystemExit(main())
