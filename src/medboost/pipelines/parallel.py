"""Several training runs at once, one process each, the cores shared equally between them.

What it is for: small models leave cores (or a GPU) idle. On this project's 2-core CPUs, bf16 kernels gain nothing
from a second thread, so two one-thread bf16 runs side by side take about half the time of the same runs one after
the other; float32 runs of a tiny ViT gain ~1.5x from a second thread, so two one-thread runs still finish sooner
than two two-thread runs in turn. On a GPU a small model's steps are launch-bound, and a dozen processes keep it busy.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

import torch

from medboost.engine.config import RunConfig
from medboost.engine.trainer import finished_result
from medboost.pipelines.classification import train_classifier


def threads_per_job(jobs: int, total: int | None = None) -> int:
    """An equal share of ``total`` intra-op threads (default: this process's) for each of ``jobs`` processes."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    return max(1, (total or torch.get_num_threads()) // jobs)


@contextmanager
def environment(**values: str):
    """Set environment variables for the processes started inside, and restore this process's own afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_in_processes(
    fn: Callable[..., Any],
    calls: Mapping[Hashable, tuple],
    jobs: int,
    threads: int | None = None,
    on_done: Callable[[Hashable, Any], None] | None = None,
    stop_at: float | None = None,
) -> dict[Hashable, Any]:
    """``{key: fn(*args)}`` for every ``key: args`` of ``calls``, computed in up to ``jobs`` processes with
    ``threads`` intra-op threads each (default: an equal share). ``fn`` must be importable (a module-level function).
    ``on_done(key, result)`` is called in this process as each call finishes. With ``stop_at`` (a
    ``time.perf_counter()`` value) no call starts after that time: the running ones finish, the others are left out
    of the result. The first failed call's exception is raised once the others have finished."""
    threads = threads or threads_per_job(jobs)
    workers = max(1, min(jobs, len(calls)))
    queue = iter(calls.items())
    futures: dict = {}

    def submit_next():
        """Hand the next call to the pool and return its future; None when none is left or the time is up. Calls
        are submitted one per free worker, never ahead: the pool would move queued calls to its workers, where
        ``cancel()`` no longer stops them."""
        if stop_at is not None and time.perf_counter() >= stop_at:
            return None
        item = next(queue, None)
        if item is None:
            return None
        future = pool.submit(_with_threads, threads, fn, *item[1])
        futures[future] = item[0]
        return future

    # spawn: a forked child would inherit the parent's OpenMP thread-pool state, which can deadlock. The OpenMP runtime
    # reads its thread count from the environment when it loads, before any torch.set_num_threads: without the
    # variable each worker kept a second spinning thread (4 threads on 2 cores, 3x slower epochs). The pool's workers
    # start at their first submit, inside this block.
    with environment(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)):
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        running = {future for future in (submit_next() for _ in range(workers)) if future is not None}
    with pool:
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                if on_done is not None and future.exception() is None:
                    on_done(futures[future], future.result())
                if (following := submit_next()) is not None:
                    running.add(following)
        return {key: future.result() for future, key in futures.items()}


def _with_threads(threads: int, fn: Callable[..., Any], *args) -> Any:
    torch.set_num_threads(threads)
    return fn(*args)


def train_in_processes(
    cfgs: Mapping[Hashable, RunConfig],
    jobs: int,
    make_plots: bool = True,
    on_done: Callable[[Hashable, dict], None] | None = None,
    stop_at: float | None = None,
) -> dict[Hashable, dict]:
    """Train every config of ``cfgs`` (key -> RunConfig; classification or segmentation) in up to ``jobs``
    processes; returns key -> result (``make_plots``: the classifiers' figures). An
    interrupted run resumes (as ``train_classifier`` does). No progress bars (several would interleave): each run's
    per-epoch metrics grow in its logs/metrics.csv. ``stop_at``: start no run after that ``time.perf_counter()``
    value (the runs not started are left out of the result)."""
    calls = {key: (cfg, make_plots) for key, cfg in cfgs.items()}
    return run_in_processes(_train_quietly, calls, jobs, on_done=on_done, stop_at=stop_at)


def train_unfinished(
    cfgs: Mapping[Hashable, RunConfig],
    jobs: int,
    on_done: Callable[[Hashable, dict], None] | None = None,
    stop_at: float | None = None,
) -> dict[Hashable, dict]:
    """What a long benchmark does before it assembles its report: train, ``jobs`` at a time, the runs of ``cfgs``
    that have not finished with exactly their config (a finished one is left alone), saying how many."""
    pending = {key: cfg for key, cfg in cfgs.items() if finished_result(cfg) is None}
    print(f"{len(pending)} run(s) to train, {jobs} at a time, {threads_per_job(jobs)} thread(s) each", flush=True)
    return train_in_processes(pending, jobs, make_plots=False, on_done=on_done, stop_at=stop_at)


def _train_quietly(cfg: RunConfig, make_plots: bool) -> dict:
    cfg.trainer.progress = False
    if cfg.task == "segmentation":
        from medboost.pipelines.segmentation import train_segmenter  # its data stack loads only when needed

        return train_segmenter(cfg)
    if cfg.task != "classification":
        raise ValueError(f"runs side by side: task {cfg.task!r} is not supported (classification, segmentation)")
    return train_classifier(cfg, make_plots=make_plots)
