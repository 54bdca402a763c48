"""Session fixtures for the harness tests: tiny local tasks for lmms-eval and
lm-eval, and a helper that runs the real console scripts as subprocesses. The
tiny models and their adapters (``hw``, ``qwen2vl``, ``text_lm``,
``misfit_adapter``, ``merge_cache``) are in tests/conftest.py: the backend
tests use them too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------
# tiny local tasks
# ---------------------------------------------------------------------------
_MM_UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + "\\nAnswer the question using a single word or phrase."


def process_results(doc, results):
    pred = results[0].strip().lower()
    return {"exact_match": float(pred == doc["answer"])}


def mc_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def mc_doc_to_choice(doc):
    return ["yes", "no"]


def mc_doc_to_target(doc):
    return 0 if doc["answer"] == "yes" else 1
"""

_MM_GEN_YAML = """
task: hm_pope_mini
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: data/pope_mini.parquet
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
  until: ["\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

_MM_LL_YAML = """
task: hm_pope_mc_mini
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: data/pope_mini.parquet
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.mc_doc_to_text
doc_to_choice: !function utils.mc_doc_to_choice
doc_to_target: !function utils.mc_doc_to_target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


@pytest.fixture(scope="session")
def mm_tasks(hw) -> Path:
    """An lmms-eval include path with ``hm_pope_mini`` (generate_until, images)
    and ``hm_pope_mc_mini`` (multiple_choice -> loglikelihood, images)."""
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    d = hw / "mm_tasks"
    (d / "data").mkdir(parents=True, exist_ok=True)
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 30), (20, 20, 20), (240, 240, 240)]
    rows = {"question_id": [], "question": [], "answer": [], "image": []}
    for i, c in enumerate(colors):
        rows["question_id"].append(str(i))
        rows["question"].append(f"Is there a {'red' if i % 2 == 0 else 'blue'} square in the image?")
        rows["answer"].append("yes" if i % 2 == 0 else "no")
        rows["image"].append(PILImage.new("RGB", (56, 56), c))
    feats = Features(
        {
            "question_id": Value("string"),
            "question": Value("string"),
            "answer": Value("string"),
            "image": Image(),
        }
    )
    Dataset.from_dict(rows, features=feats).to_parquet(str(d / "data" / "pope_mini.parquet"))
    (d / "utils.py").write_text(_MM_UTILS)
    (d / "hm_pope_mini.yaml").write_text(_MM_GEN_YAML)
    (d / "hm_pope_mc_mini.yaml").write_text(_MM_LL_YAML)
    return d


_TXT_YAML_GEN = """
task: hm_text_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

_TXT_YAML_MC = """
task: hm_text_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: ["yes", "no"]
doc_to_target: "{{{{0 if answer == 'yes' else 1}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

_TXT_YAML_PPL = """
task: hm_text_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}} {{{{answer}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 0.0
"""


@pytest.fixture(scope="session")
def text_tasks(hw) -> Path:
    """An lm-eval include path with hm_text_gen / hm_text_mc / hm_text_ppl."""
    d = hw / "text_tasks"
    d.mkdir(exist_ok=True)
    data = d / "qa.jsonl"
    qa = [
        ("is the sky blue", "yes"),
        ("is fire cold", "no"),
        ("is water wet", "yes"),
        ("can fish fly", "no"),
        ("is snow white", "yes"),
        ("is ice hot", "no"),
    ]
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in qa))
    for name, tmpl in (
        ("hm_text_gen", _TXT_YAML_GEN),
        ("hm_text_mc", _TXT_YAML_MC),
        ("hm_text_ppl", _TXT_YAML_PPL),
    ):
        (d / f"{name}.yaml").write_text(textwrap.dedent(tmpl.format(data=str(data))))
    return d


# ---------------------------------------------------------------------------
# running the console scripts
# ---------------------------------------------------------------------------
def _env(hw: Path) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_DATASETS_CACHE=str(hw / "hf_datasets_cache"),
        OMP_NUM_THREADS="2",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def run_cli(hw):
    """``run_cli("lmms_eval", [...]) -> CompletedProcess`` (text, cwd = repo)."""

    def run(script: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
        exe = VENV_BIN / script
        cmd = (
            [str(exe)]
            if exe.exists()
            else [
                sys.executable,
                "-m",
                {
                    "lmms_eval": "harness_merge.harness.lmms_cli",
                    "lm-eval-merged": "harness_merge.harness.lm_eval_cli",
                }[script],
            ]
        )
        return subprocess.run(
            cmd + [str(a) for a in args],
            cwd=REPO,
            env=_env(hw),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def find_results(out_dir: Path) -> tuple[dict, dict[str, list[dict]]]:
    """(results json, {task: samples}) of the single run under ``out_dir``."""
    res = sorted(out_dir.rglob("*results*.json"))
    assert res, f"no results file under {out_dir}: {list(out_dir.rglob('*'))}"
    results = json.loads(res[-1].read_text())
    import re

    samples: dict[str, list[dict]] = {}
    tasks = sorted(results.get("results", {}), key=len, reverse=True)
    # lmms-eval: <date>_samples_<task>.jsonl; lm-eval: samples_<task>_<date>.jsonl
    for f in out_dir.rglob("*samples_*.jsonl"):
        rest = f.name.split("samples_", 1)[1][: -len(".jsonl")]
        task = next((t for t in tasks if re.fullmatch(re.escape(t) + r"(_\d.*)?", rest)), rest)
        samples[task] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return results, samples
