"""Setup's last step: one real ``lmms_eval --model merged`` evaluation (seconds).

Builds a tiny Qwen2-VL and two random LoRA adapters in a temp dir, merges them
with ``copa`` through the real console script (``lmms_eval``, the harness's
own CLI with our model registered), on one document of the demo's colour task,
and checks that a results file with a score came back. Exits non-zero, with the
harness's output, if anything breaks: a broken install fails here, at setup,
not in the middle of a user's run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK = "demo_colour"


def main() -> int:
    from harness_merge.demo.tiny import build_tiny_qwen2vl, random_lora

    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="hm-smoke-") as tmp:
        tmp = Path(tmp)
        base = build_tiny_qwen2vl(tmp / "base", seed=0)
        ads = [random_lora(base, tmp / f"lora{i}", rank=4, alpha=8, seed=i) for i in (1, 2)]
        margs = f"pretrained={base},adapters=[{ads[0]},{ads[1]}],method=copa,cache_dir={tmp / 'cache'}"
        cmd = [
            str(Path(sys.executable).parent / "lmms_eval"),
            "--model",
            "merged",
            "--model_args",
            margs,
            "--tasks",
            TASK,
            "--include_path",
            str(REPO / "task_configs/local/demo"),
            "--limit",
            "1",
            "--batch_size",
            "1",
            "--output_path",
            str(tmp / "out"),
            "--verbosity",
            "WARNING",
        ]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        found = sorted((tmp / "out").rglob("*_results.json"))
        score = None
        if found:
            res = json.loads(found[-1].read_text()).get("results", {}).get(TASK, {})
            score = next(
                (v for k, v in res.items() if "stderr" not in k and isinstance(v, (int, float))), None
            )
        if proc.returncode != 0 or score is None:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            print(
                f"[smoke] FAIL: lmms_eval exit {proc.returncode}, results file: {found[-1] if found else 'none'}",
                file=sys.stderr,
            )
            return 1
    print(
        f"[smoke] ok: lmms_eval --model merged (copa, 2 adapters) scored {TASK} on 1 doc in {time.time() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
