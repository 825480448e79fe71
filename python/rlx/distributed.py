"""PPO and GRPO with rollouts on Ray workers: ``rlx ppo --ray ADDRESS --workers N``.

Three kinds of process:

* rollout workers (Ray actors, :class:`RolloutWorker`): each holds the policy, the reference
  and the reward model of the job; per iteration they take the learner's weights and sample,
  score and compute reference log-probs for their share of the prompts;
* one learner (a Ray actor, :class:`Learner`): the same Rust stage driver ``rlx ppo`` runs in
  one process (prompt order, advantages, updates, checkpoints), asking a :class:`WorkerPool`
  for each rollout instead of sampling itself;
* the driver (:func:`run`, ``python -m rlx.distributed``): connects to Ray, starts the learner,
  waits, reports.

Weights travel once per iteration: the policy's trainable tensors as safetensors bytes (the
LoRA factors and value head with LoRA; every weight with full fine-tuning), put in the object
store once and pulled by every worker. Every answer samples from its own random stream (run
seed, iteration, prompt position, sample index) and the kernels do not depend on batch
composition, so a run with any number of workers reproduces the single-process run bit for
bit. A worker that dies is replaced and its prompts are issued again; the learner checkpoints
as the single-process run does, and ``resume`` continues from the newest checkpoint.

Ray is an optional dependency: ``pip install 'rlx[ray]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Union

from rlx._rlx import _RolloutWorkerModels, run_on_policy

__all__ = ["RolloutWorker", "WorkerPool", "Learner", "run", "main"]


def _ray():
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "rlx.distributed needs Ray: pip install 'rlx[ray]' (or pip install ray)"
        ) from e
    return ray


class RolloutWorker:
    """A rollout worker (use as a Ray actor): the job's policy, reference and reward model.

    ``fail_at_iteration`` is fault injection for tests: the process exits during that
    iteration's rollout, as a crashed host would.
    """

    def __init__(self, job: str, fail_at_iteration: Optional[int] = None):
        self._models = _RolloutWorkerModels(job)
        self._fail_at = fail_at_iteration

    def load_policy_state(self, state: bytes) -> None:
        self._models.load_policy_state(state)

    def collect(self, request: str) -> str:
        if self._fail_at is not None and json.loads(request)["iteration"] == self._fail_at:
            os._exit(17)
        return self._models.collect(request)

    def pid(self) -> int:
        return os.getpid()


class WorkerPool:
    """The learner's rollout collector: N :class:`RolloutWorker` actors.

    Each rollout: the policy state goes into the object store once, the prompts are dealt in
    contiguous shares, and each worker loads the state then collects its share. A worker that
    dies (its actor or host gone) is replaced by a fresh one, which receives the same state
    and the same prompts — the samples do not depend on which worker draws them.
    """

    def __init__(
        self,
        job: str,
        workers: int,
        worker_options: Optional[Dict[str, Any]] = None,
        fail_at_iteration: Optional[Dict[int, int]] = None,
        max_replacements: int = 8,
    ):
        if workers < 1:
            raise ValueError("at least one rollout worker is needed")
        self._ray = _ray()
        self._job = job
        self._options = {"num_cpus": 1, **(worker_options or {})}
        self._faults = dict(fail_at_iteration or {})
        self._replacements_left = max_replacements
        self.replacements = 0
        self.stats: List[Dict[str, float]] = []
        self._actor_class = self._ray.remote(RolloutWorker)
        self._workers = [self._spawn(i) for i in range(workers)]

    def _spawn(self, index: int, faulty: bool = True):
        fault = self._faults.get(index) if faulty else None
        return self._actor_class.options(**self._options).remote(self._job, fault)

    def collect(self, state: bytes, request: str) -> str:
        ray = self._ray
        t0 = time.perf_counter()
        state_ref = ray.put(state)
        req = json.loads(request)
        prompts = req["prompts"]
        n = len(self._workers)
        shares = [prompts[i * len(prompts) // n : (i + 1) * len(prompts) // n] for i in range(n)]
        pending = {i: share for i, share in enumerate(shares) if share}
        parts: List[str] = []
        sync_seconds = 0.0
        while pending:
            calls = {}
            for i, share in pending.items():
                w = self._workers[i]
                sub = json.dumps({**req, "prompts": share})
                calls[i] = (w.load_policy_state.remote(state_ref), w.collect.remote(sub))
            failed = {}
            for i, (sync, result) in calls.items():
                try:
                    ts = time.perf_counter()
                    ray.get(sync)
                    sync_seconds = max(sync_seconds, time.perf_counter() - ts)
                    parts.append(ray.get(result))
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                    if self._replacements_left == 0:
                        raise RuntimeError(
                            f"rollout worker {i} died and no replacements are left: {e}"
                        ) from e
                    self._replacements_left -= 1
                    self.replacements += 1
                    print(
                        f"rlx.distributed: rollout worker {i} died during iteration "
                        f"{req['iteration'] + 1}; replacing it and re-issuing its "
                        f"{len(pending[i])} prompts",
                        file=sys.stderr,
                    )
                    self._workers[i] = self._spawn(i, faulty=False)
                    failed[i] = pending[i]
            pending = failed
        self.stats.append(
            {
                "iteration": req["iteration"],
                "state_bytes": len(state),
                "sync_seconds": sync_seconds,
                "rollout_seconds": time.perf_counter() - t0,
            }
        )
        # Each part is a JSON list; joined without re-parsing (numbers keep their text).
        return "[" + ",".join(p[1:-1] for p in parts if p.strip() != "[]") + "]"


class Learner:
    """The learner (use as a Ray actor): runs the job's stage with a :class:`WorkerPool`.

    ``fail_after_iteration`` is fault injection for tests: the process exits when the metrics
    of the next iteration arrive (before that iteration's checkpoint), as a crashed learner or
    driver would.
    """

    def __init__(
        self,
        job: str,
        workers: int,
        worker_options: Optional[Dict[str, Any]] = None,
        worker_faults: Optional[Dict[int, int]] = None,
        fail_after_iteration: Optional[int] = None,
    ):
        self._job = job
        self._fail_after = fail_after_iteration
        self.pool = WorkerPool(job, workers, worker_options, worker_faults)

    def _on_metrics(self, line: str) -> None:
        m = json.loads(line)
        if self._fail_after is not None and m.get("iteration") == self._fail_after + 1:
            os._exit(18)
        keys = ("iteration", "step", "reward_mean", "kl", "clip_fraction")
        print(
            "  ".join(f"{k} {m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float))),
            file=sys.stderr,
            flush=True,
        )

    def run(self) -> Dict[str, Any]:
        outcome, steps, last, model_dir = run_on_policy(
            self._job,
            collector=self.pool,
            on_metrics=self._on_metrics,
            on_message=lambda text: print(text, file=sys.stderr, flush=True),
        )
        return {
            "outcome": outcome,
            "steps": steps,
            "last": json.loads(last),
            "model_dir": model_dir,
            "replacements": self.pool.replacements,
            "sync": self.pool.stats,
        }


def run(
    job: Union[str, Dict[str, Any]],
    *,
    address: Optional[str] = None,
    workers: int = 2,
    worker_options: Optional[Dict[str, Any]] = None,
    learner_options: Optional[Dict[str, Any]] = None,
    worker_faults: Optional[Dict[int, int]] = None,
    learner_fail_after_iteration: Optional[int] = None,
) -> Dict[str, Any]:
    """Runs an on-policy job (the settings of ``rlx ppo``/``rlx grpo`` as a dict or JSON, e.g.
    ``{"stage": "ppo", "model": ..., "data": ..., "reward_model": ..., "out": ...}``) with
    ``workers`` rollout workers on the Ray cluster at ``address`` (``"auto"``: the cluster
    ``ray start`` runs on this machine; ``"HOST:PORT"``: that cluster; ``None`` or ``"local"``:
    a new cluster inside this process). An already initialised Ray is used as it is.

    Returns ``{"outcome", "steps", "last", "model_dir", "replacements", "sync"}``; ``sync``
    lists per iteration the bytes of policy state sent and the seconds spent.
    """
    ray = _ray()
    text = job if isinstance(job, str) else json.dumps(job)
    if not ray.is_initialized():
        if address in (None, "local"):
            cpus = max(os.cpu_count() or 1, workers + 1)
            ray.init(num_cpus=cpus, include_dashboard=False)
        else:
            ray.init(address=address)
    options = {"num_cpus": 1, **(learner_options or {})}
    learner = (
        ray.remote(Learner)
        .options(**options)
        .remote(text, workers, worker_options, worker_faults, learner_fail_after_iteration)
    )
    try:
        return ray.get(learner.run.remote())
    finally:
        ray.kill(learner)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rlx.distributed",
        description="Run an rlx PPO/GRPO job with rollouts on Ray workers.",
    )
    p.add_argument("--address", default="auto", help="Ray address (auto, HOST:PORT, local)")
    p.add_argument("--workers", type=int, default=2, help="rollout workers")
    p.add_argument("--job", required=True, help="the job as JSON (or @FILE)")
    p.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs reserved per worker")
    a = p.parse_args(argv)
    job = a.job
    if job.startswith("@"):
        with open(job[1:], encoding="utf-8") as f:
            job = f.read()
    try:
        report = run(
            job,
            address=a.address,
            workers=a.workers,
            worker_options={"num_cpus": a.worker_cpus},
        )
    except Exception as e:  # the CLI prints one clear line, not a traceback
        print(f"rlx.distributed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    stage = json.loads(job).get("stage", "run")
    if report["outcome"] == "finished":
        print(
            f"{stage}: finished after {report['steps']} steps; model in {report['model_dir']}",
            file=sys.stderr,
        )
    else:
        print(f"{stage}: stopped after {report['steps']} steps; continue with --resume",
              file=sys.stderr)
    print(json.dumps(report["last"]))
    return 0


if __name__ == "__main__":
    # Run the imported module's main: Ray ships classes of `__main__` by value, and the
    # compiled classes they use cannot travel that way; `rlx.distributed`'s go by name.
    from rlx.distributed import main as _main

    sys.exit(_main())
