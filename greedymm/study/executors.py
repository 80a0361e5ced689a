"""Where a study's runs execute (SPEC Sec. 11): `local` (one after another in this process), `processes` (worker
processes: a share of the CPU threads, a GPU or a fraction of one each) and `ray` (a Ray cluster or a local Ray);
each runs `greedymm.study.records.execute_run`, and a failure is a record, never an exception that stops the others.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch

from .grid import RunSpec
from .records import execute_run, failed_record

log = logging.getLogger(__name__)

EXECUTORS = ("local", "processes", "ray")


class LocalExecutor:
    """Runs one after another in the calling process (the default).

    Args:
        device: where to train; CUDA when available if None.
        threads: torch CPU threads per run; None leaves torch's setting.
    """

    name = "local"

    def __init__(self, device: Optional[Union[str, torch.device]] = None, threads: Optional[int] = None) -> None:
        self.device, self.threads = device, threads

    def map(self, specs: Sequence[RunSpec]) -> Iterator[dict]:
        """Yield each run's record as soon as it is done."""
        for spec in specs:
            yield execute_run(spec, self.device, self.threads)


# The device and threads of this worker process (set once by _init_worker).
_WORKER: Dict[str, Any] = {}


def _init_worker(slots: Any, threads: int) -> None:
    slot = slots.get()  # each worker takes one device slot: "cpu", or "cuda:i" (repeated for several runs per GPU)
    torch.set_num_threads(threads)
    if slot.startswith("cuda"):
        torch.cuda.set_device(torch.device(slot))
    _WORKER.update(device=slot, threads=threads)


def _worker_run(spec: RunSpec) -> dict:
    return execute_run(spec, _WORKER["device"], _WORKER["threads"])


def start_context() -> mp.context.BaseContext:
    """forkserver where available (Linux), else spawn: never fork a process in which torch runs threads."""
    return mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")


class ProcessExecutor:
    """Worker processes on this machine, each running one run at a time.

    Args:
        workers: processes on the CPU (default: one per core, at most one per run); ignored with GPUs, where it is
            len(gpus) * runs_per_gpu.
        threads: torch threads per CPU worker (default: the cores shared out, at least 1); 1 per GPU worker unless
            given.
        gpus: GPU indices to use, one device slot each; None = every visible GPU, [] = CPU only.
        runs_per_gpu: runs that share one GPU at a time (several small runs fill a large GPU).
    """

    name = "processes"

    def __init__(self, workers: Optional[int] = None, threads: Optional[int] = None,
                 gpus: Optional[Sequence[int]] = None, runs_per_gpu: int = 1) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"workers={workers} must be at least 1 (or None for one per core)")
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads} must be at least 1 (or None to share the cores out)")
        if runs_per_gpu < 1:
            raise ValueError(f"runs_per_gpu={runs_per_gpu} must be at least 1")
        if gpus is None:
            gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        self.workers, self.threads, self.gpus, self.runs_per_gpu = workers, threads, list(gpus), runs_per_gpu

    def slots(self, n_runs: int) -> List[str]:
        """The device of each worker process for a study of n_runs runs."""
        if self.gpus:
            slots = [f"cuda:{g}" for g in self.gpus for _ in range(self.runs_per_gpu)]
        else:
            slots = ["cpu"] * (self.workers or os.cpu_count() or 1)
        return slots[:max(1, n_runs)]

    def threads_per_worker(self, n_workers: int) -> int:
        """torch threads of each worker: given, 1 on GPUs, else the cores shared out."""
        if self.threads is not None:
            return self.threads
        return 1 if self.gpus else max(1, (os.cpu_count() or 1) // n_workers)

    def map(self, specs: Sequence[RunSpec]) -> Iterator[dict]:
        """Yield each run's record as soon as it is done (in completion order)."""
        if not specs:
            return
        slots = self.slots(len(specs))
        threads = self.threads_per_worker(len(slots))
        ctx = start_context()
        queue = ctx.SimpleQueue()
        for slot in slots:
            queue.put(slot)
        pool = ProcessPoolExecutor(len(slots), mp_context=ctx, initializer=_init_worker, initargs=(queue, threads))
        try:
            futures = {pool.submit(_worker_run, spec): spec for spec in specs}
            for future in as_completed(futures):
                try:
                    yield future.result()
                except Exception as err:  # the worker died (e.g. out of memory): the pool is broken
                    yield failed_record(futures[future], err, device="processes")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _ray_run(spec: RunSpec, gpu: bool, threads: int) -> dict:
    # Ray makes the task's GPUs the only visible ones, so "cuda" is the one it asked for.
    return execute_run(spec, "cuda" if gpu else "cpu", threads)


class RayExecutor:
    """Ray tasks: on a running cluster (`address`) or on a local Ray started for the study and stopped after it.

    Each task asks for `cpus_per_run` CPUs (its torch threads) and `gpus_per_run` GPUs (fractions share a GPU), so
    Ray spreads one study over every node and GPU. The data must be on a shared filesystem or is prepared on each
    node by the tasks themselves (`greedymm.data.prepare_data`); logs and checkpoints go to the study's folders,
    which should be shared too. Ray is an optional extra: `pip install greedymm[ray]`.

    Args:
        address: a cluster ("auto", "ray://host:10001", ...); None starts a local Ray.
        cpus_per_run: CPUs (and torch threads) per run.
        gpus_per_run: GPUs per run (e.g. 0.5); None = 1 when the cluster has GPUs, else 0.
        num_cpus: CPUs of the local Ray (None: all); ignored with `address`.
        runtime_env: Ray's runtime_env, e.g. {"py_modules": [greedymm]} to ship this package to a cluster (None:
            the nodes have greedymm installed); a local Ray gets this package's folder on its PYTHONPATH.
    """

    name = "ray"

    def __init__(self, address: Optional[str] = None, cpus_per_run: float = 1, gpus_per_run: Optional[float] = None,
                 num_cpus: Optional[int] = None, runtime_env: Optional[dict] = None) -> None:
        if cpus_per_run <= 0:
            raise ValueError(f"cpus_per_run={cpus_per_run} must be positive")
        if gpus_per_run is not None and gpus_per_run < 0:
            raise ValueError(f"gpus_per_run={gpus_per_run} must be 0 or more (fractions share a GPU)")
        self.address, self.cpus_per_run, self.gpus_per_run = address, cpus_per_run, gpus_per_run
        self.num_cpus, self.runtime_env = num_cpus, runtime_env

    def _init(self, ray: Any) -> bool:
        if ray.is_initialized():
            return False
        if self.address is not None:
            ray.init(address=self.address, runtime_env=self.runtime_env, log_to_driver=False)
            return True
        # A local Ray: its processes inherit this environment, so its workers import greedymm from where this
        # process does (a runtime_env would do the same at the cost of a per-task environment set-up).
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        before = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, before) if p)
        try:
            ray.init(num_cpus=self.num_cpus, runtime_env=self.runtime_env, include_dashboard=False,
                     log_to_driver=False)
        finally:
            if before is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = before
        return True

    def map(self, specs: Sequence[RunSpec]) -> Iterator[dict]:
        """Yield each run's record as soon as its task is done."""
        if not specs:
            return
        try:
            import ray
        except ImportError:
            raise ImportError("the 'ray' executor needs Ray: pip install 'greedymm[ray]' (or pip install ray)") \
                from None
        started = self._init(ray)
        try:
            gpus = self.gpus_per_run
            if gpus is None:
                gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            threads = max(1, int(self.cpus_per_run))
            task = ray.remote(num_cpus=self.cpus_per_run, num_gpus=gpus, max_retries=0)(_ray_run)
            pending = {task.remote(spec, gpus > 0, threads): spec for spec in specs}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    spec = pending.pop(ref)
                    try:
                        yield ray.get(ref)
                    except Exception as err:  # the task or its worker failed before it could report
                        yield failed_record(spec, err, device="ray")
        finally:
            if started:
                ray.shutdown()


Executor = Union[LocalExecutor, ProcessExecutor, RayExecutor]


def make_executor(name: str = "local", **options: Any) -> Executor:
    """An executor by name.

    Args:
        name: "local", "processes" or "ray".
        options: its settings (see LocalExecutor, ProcessExecutor, RayExecutor).
    Returns:
        The executor.
    """
    kinds = {"local": LocalExecutor, "processes": ProcessExecutor, "ray": RayExecutor}
    if name not in kinds:
        raise ValueError(f"executor={name!r} is unknown; allowed: {', '.join(EXECUTORS)}")
    return kinds[name](**options)


def executor_of(executor: Union[str, Executor, None]) -> Executor:
    """`executor` itself, or the default executor of a name (None = local)."""
    if executor is None or isinstance(executor, str):
        return make_executor(executor or "local")
    if not hasattr(executor, "map"):
        raise TypeError(f"executor={executor!r} must be a name ({', '.join(EXECUTORS)}) or an executor with map()")
    return executor

