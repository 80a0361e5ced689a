"""Where a study's runs execute (SPEC Sec. 11): `local` (one after another in this process), `processes` (worker
processes on this machine: a share of the CPU threads, one GPU, or a fraction of one each) and `ray` (Ray tasks on
a cluster or a local Ray). Each run is `execute_run`: train or resume it, its CUR (experiment.run_one) and its
sparsity rho, returned as one record; a failure is a record too, never an exception that stops the others.
"""
from __future__ import annotations

import importlib
import logging
import math
import multiprocessing as mp
import os
import platform
import socket
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch

from ..data import build_loaders
from ..experiment import ModelFn, make_model, run_one
from ..regularization import sparsity
from ..train import default_device, load_checkpoint
from .grid import RunSpec

log = logging.getLogger(__name__)

EXECUTORS = ("local", "processes", "ray")
# What a record keeps of run_one's output (the history and the paths of the run stay in its own folder).
FIGURES = ("acc", "acc0", "acc1", "acc0_cut", "acc1_cut", "u_m1_m0", "u_m0_m1", "d_util", "d_speed", "val_acc",
           "test_acc", "test_acc0", "test_acc1", "best_epoch", "steps", "steps_this_call", "stop_reason",
           "precision", "log_dir", "best_path")


def device_name(device: torch.device) -> str:
    """The device as people name it: "cpu (<processor>)" or "cuda:0 (NVIDIA H100 ...)"."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def model_factory(model: str) -> Optional[ModelFn]:
    """The model factory a Study names: None for "" (the dataset's default), else the function at "module:function".

    Args:
        model: "" or "module:function" (e.g. "greedymm.model:mmtm_convnet"), a function num_classes -> model.
    Returns:
        The function, or None.
    """
    if not model:
        return None
    module, _, attr = model.partition(":")
    try:
        fn = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model={model!r} cannot be loaded ({err}); give 'module:function' of an importable module"
                         ) from None
    if not callable(fn):
        raise ValueError(f"model={model!r} is not a function (num_classes -> two-branch model)")
    return fn


def best_sparsity(spec: RunSpec, best_path: str, device: torch.device) -> float:
    """rho of a run's best checkpoint: the fraction of its parameters with |theta| < tau (paper Sec. 6.3).

    Args:
        spec: the run (its data settings give the classes and input channels of its model).
        best_path: the run's best.pt.
        device: where to load it.
    Returns:
        rho in [0, 1].
    """
    data = spec.data_config()
    loaders = build_loaders(data, device, spec.seed, progress=False)
    channels = tuple(loaders.channels)
    model = make_model(data, spec.algorithm, spec.seed, len(loaders.classes), channels, model_factory(spec.model))
    model.load_state_dict(load_checkpoint(best_path, map_location="cpu")["model"])
    return sparsity(model, spec.tau)


def _failure(err: BaseException) -> dict:
    return {"status": "failed", "error": f"{type(err).__name__}: {err}",
            "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__, limit=8))}


def failed_record(spec: RunSpec, err: BaseException, device: str = "", wall_s: float = math.nan) -> dict:
    """The record of a run that could not even report (its worker died, a Ray task failed)."""
    return {**spec.settings(), **_failure(err), "wall_s": wall_s, "device": device, "host": socket.gethostname()}


def execute_run(spec: RunSpec, device: Optional[Union[str, torch.device]] = None,
                threads: Optional[int] = None) -> dict:
    """Train (or resume) one run of a study, measure its CUR and sparsity, and return its record.

    Args:
        spec: the run.
        device: where to train; CUDA when available if None.
        threads: torch CPU threads for this run (restored afterwards); None leaves them as they are.
    Returns:
        spec.settings() plus status ("ok" or "failed"), the figures (FIGURES, rho, train_time_s, epochs) or the
        error and traceback, wall_s (this call), device and host.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    start = time.perf_counter()
    dev = torch.device(device) if device is not None else default_device()
    record: Dict[str, Any] = spec.settings()
    try:
        out = run_one(spec.data_config(), spec.train_config(), spec.algorithm, spec.seed, dev, resume=True,
                      model_fn=model_factory(spec.model), model_name=spec.model, progress=False)
        if out["status"] != "ok":
            record.update({k: out[k] for k in ("status", "error", "traceback")})
        else:
            record.update({k: out.get(k, math.nan) for k in FIGURES})
            history = out.get("history") or []
            record["epochs"] = len(history)
            record["train_time_s"] = float(sum(e.get("time", 0.0) for e in history))
            record["rho"] = best_sparsity(spec, out["best_path"], dev)
            record["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as err:  # recorded: the study goes on with its other runs
        log.exception("run %s failed", spec.run_name)
        record.update(_failure(err))
    finally:
        if threads is not None:
            torch.set_num_threads(previous)
    record.update({"wall_s": time.perf_counter() - start, "device": device_name(dev), "host": socket.gethostname()})
    return record


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

