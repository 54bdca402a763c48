"""Where the leaderboard's rows run: one after another in this process
(``serial``, the default) or as Ray tasks (``ray``) on a local Ray or on an
existing cluster::

    harness-merge leaderboard grid.yaml --executor ray [--address HOST:PORT] [--workers N]

An executor only evaluates rows; the runner stays the one writer of
``results.json`` and records each row as it comes back, so a Ray grid resumes
like a serial one. Ray runs ``N`` long-lived workers (actors), each evaluating
one row at a time with the grid's ``resources`` (``{num_cpus: 1, num_gpus: 0}``
by default); with ``backend: vllm`` each worker starts one engine sized for
every LoRA row, which then serves all the LoRA rows it is given.

On a cluster every node needs this package, the harnesses and the models at
the same paths (or hub ids); the merge cache is per node unless
``HARNESS_MERGE_CACHE`` points at shared storage.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import MergeError

EXECUTORS = ("serial", "ray")
LOCAL_START_ATTEMPTS = 3
#: Environment passed to Ray workers (the merge cache, offline switches, threads, verbosity).
_ENV_PREFIXES = (
    "HARNESS_MERGE_",
    "HF_",
    "TRANSFORMERS_",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TOKENIZERS_PARALLELISM",
    "VERBOSITY",
    "LMMS_EVAL",
    "VLLM_",
)


@dataclass
class RowResult:
    row: object  # runner.Row
    tasks: list[str]
    per_task: dict
    record: dict
    error: str | None
    seconds: float
    worker: str = "local"
    lmms: dict | None = None  # lmms-eval's own results of the row (with its per-sample logs)


def evaluate_one(row, grid, tasks: list[str], task_manager, worker: str = "local") -> RowResult:
    """Evaluate one row; an exception becomes the row's ``error`` (one broken
    row must not lose the others)."""
    from . import runner

    t0 = time.perf_counter()
    try:
        per_task, record, lmms = runner.evaluate_row(row, grid, tasks, task_manager)
        error = None
    except Exception as e:
        per_task, record, lmms, error = {}, {}, None, f"{type(e).__name__}: {e}"
        print(f"[leaderboard] {row.label} failed: {error}", file=sys.stderr, flush=True)
    return RowResult(
        row, list(tasks), per_task, record, error, round(time.perf_counter() - t0, 2), worker, lmms
    )


class SerialExecutor:
    """Rows one after another in this process (one vLLM engine shared by the
    LoRA rows, set up by the runner)."""

    name = "serial"
    workers = 1

    def run(self, grid, pending: list[tuple], task_manager) -> Iterator[RowResult]:
        for row, tasks in pending:
            yield evaluate_one(row, grid, tasks, task_manager)


class _RowWorker:
    """A Ray actor: one process that keeps its task manager (and, with vLLM,
    its engine) across the rows it evaluates."""

    def __init__(self, grid, vllm_rows=None):
        from . import runner

        self.grid = grid
        self.name = f"{os.uname().nodename}:{os.getpid()}"
        self.tm = runner._task_manager(grid.include_path)
        if grid.backend == "vllm" and vllm_rows:
            runner.share_vllm_engine(grid, vllm_rows)

    def evaluate(self, row, tasks):
        return evaluate_one(row, self.grid, tasks, self.tm, worker=self.name)


class RayExecutor:
    """Rows as Ray actor calls; results come back as they finish."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None):
        if workers is not None and workers < 1:
            raise MergeError(f"--workers must be >= 1, got {workers}")
        self.address = address
        self.requested = workers
        self.workers = workers or 1

    def _init(self, ray):
        env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)}
        kw = {
            "ignore_reinit_error": True,
            "include_dashboard": False,
            "logging_level": "WARNING",
            "runtime_env": {"env_vars": env},
        }
        if self.address:
            kw["address"] = self.address
            try:
                return ray.init(**kw)
            except ConnectionError as e:
                raise MergeError(f"--address {self.address}: cannot connect to a Ray cluster ({e})") from None
        # A local Ray: its raylet gives the dashboard agent 15 s to report its ports
        # and aborts when the agent's imports are slower (a loaded machine, a cold
        # page cache); a later attempt starts with warm caches.
        for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
            try:
                return ray.init(**kw)
            except Exception as e:  # Ray raises a bare Exception ("timed out during startup")
                ray.shutdown()
                if "timed out during startup" not in str(e) or attempt == LOCAL_START_ATTEMPTS:
                    raise MergeError(
                        f"--executor ray: a local Ray did not start ({e}); see /tmp/ray/session_latest/logs/"
                        f"raylet.err. On a loaded machine, start one with `ray start --head` and pass "
                        f"--address"
                    ) from None
                print(
                    f"[leaderboard] ray: local start attempt {attempt} timed out; retrying", file=sys.stderr
                )
        return None

    def run(self, grid, pending: list[tuple], task_manager=None) -> Iterator[RowResult]:
        try:
            import ray
        except ImportError:
            raise MergeError("--executor ray needs Ray: pip install 'harness-merge[ray]'") from None
        if not pending:
            return
        started = not ray.is_initialized()
        self._init(ray)
        res = dict(grid.resources)
        cpus, gpus = float(res.get("num_cpus", 1)), float(res.get("num_gpus", 0))
        total = ray.cluster_resources()
        fit = int(total.get("GPU", 0) // gpus) if gpus else int(total.get("CPU", 1) // max(cpus, 1e-9))
        n = min(len(pending), self.requested or max(1, fit))
        if self.requested and self.requested > fit:
            print(
                f"[leaderboard] ray: {self.requested} workers asked, the cluster fits {fit} with "
                f"num_cpus={cpus:g}, num_gpus={gpus:g}; the rest wait for resources",
                file=sys.stderr,
            )
        self.workers = n
        vllm_rows = [r for r, _ in pending] if grid.backend == "vllm" else None
        Worker = ray.remote(num_cpus=cpus, num_gpus=gpus)(_RowWorker)
        actors = [Worker.remote(grid, vllm_rows) for _ in range(n)]
        print(
            f"[leaderboard] ray: {n} worker(s) (num_cpus={cpus:g}, num_gpus={gpus:g} each) on "
            f"{'cluster ' + self.address if self.address else 'a local Ray'}",
            file=sys.stderr,
            flush=True,
        )
        queue = list(pending)
        inflight = {}
        try:
            for a in actors:
                if queue:
                    row, tasks = queue.pop(0)
                    inflight[a.evaluate.remote(row, tasks)] = (a, row, tasks)
            while inflight:
                done, _ = ray.wait(list(inflight), num_returns=1)
                ref = done[0]
                actor, row, tasks = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # the worker died (OOM, node lost): the row fails, the grid goes on
                    result = RowResult(
                        row, list(tasks), {}, {}, f"ray worker failed: {type(e).__name__}: {e}", 0.0
                    )
                    print(f"[leaderboard] {row.label} failed: {result.error}", file=sys.stderr, flush=True)
                    actor = Worker.remote(grid, vllm_rows)
                if queue:
                    row, tasks = queue.pop(0)
                    inflight[actor.evaluate.remote(row, tasks)] = (actor, row, tasks)
                yield result
        finally:
            for a in actors:
                ray.kill(a)
            if started:
                ray.shutdown()


def make_executor(name: str = "serial", *, address: str | None = None, workers: int | None = None):
    if name == "serial":
        if address or workers not in (None, 1):
            raise MergeError("--address and --workers apply to --executor ray only")
        return SerialExecutor()
    if name == "ray":
        return RayExecutor(address=address, workers=workers)
    raise MergeError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")


def eta_line(done: int, total: int, elapsed: float) -> str:
    """``elapsed 1m05s, ETA 2m10s`` from the wall-clock throughput so far (so it
    holds for parallel workers too)."""
    left = total - done
    eta = elapsed / done * left if done else float("nan")
    return f"elapsed {fmt_seconds(elapsed)}, ETA {fmt_seconds(eta) if left else '0s'}"


def fmt_seconds(s: float) -> str:
    if math.isnan(s):
        return "?"
    s = round(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
