"""Trials on Ray: a grid of trials sharded over workers that each hold the model once.

Detection grids, ablation conditions and experiment sweeps are embarrassingly parallel.
`RayPool` is an executor for `rh_lens.execution.runs.run_trials`: Ray actors each load the model once
(one GPU each on CUDA; on a CPU the cores are split between them), shards of consecutive
trials are dispatched to whichever actor is free (each actor shares prompt prefixes and
decodes in batches within its shard), and the driver writes every finished trial into the run's
per-trial store as it arrives, exactly as a run in one process does: `--resume` works
whatever executor ran the first part, and the scores are the same.

Ray is an optional dependency: `pip install 'rh-lens[ray]'`. Without an address a local Ray
instance is started; with one (`ray start --head` on a cluster's head node, then
`--ray-address HEAD:6379`) the actors are placed on the cluster's machines.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

from rh_lens.errors import InputError
from rh_lens.execution.runs import Task
from rh_lens.model.loading import load_model
from rh_lens.tasks.niah import Trial

SHARDS_PER_WORKER = 4
MAX_SHARD = 64


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError("running on workers needs Ray: pip install 'rh-lens[ray]'") from None
    return ray


class RayPool:
    """`workers` Ray actors, each holding the model `load()` returns (by default
    `load_model(model, device, dtype)`). Use as an executor (`map`, `call`); `close()` (or
    a `with` block) ends the actors."""

    def __init__(
        self,
        model: str,
        workers: int,
        address: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        load: Callable[[], Any] | None = None,
    ):
        if workers < 1:
            raise InputError(f"workers {workers}: must be at least 1")
        ray = _ray()
        if not ray.is_initialized():
            if address is None:  # a local instance with this machine's cores
                ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                try:
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
                except ConnectionError as e:
                    raise InputError(f"cannot reach a Ray cluster at {address}: {e}") from None
        self.ray = ray
        # Workers on GPUs when asked for, or when the cluster has them and no device is named.
        gpu = (device or "").startswith("cuda") or (device is None and ray.cluster_resources().get("GPU", 0) >= 1)
        self.device = device or ("cuda" if gpu else "cpu")
        self.dtype = dtype or ("bfloat16" if gpu else "float32")  # load_model's defaults, decided here for every worker
        load = load or partial(load_model, model, device=self.device, dtype=self.dtype)
        if gpu:
            resources = {"num_gpus": 1, "num_cpus": 1}
            threads = None
        else:  # split the cores the cluster offers between the actors
            cores = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
            threads = max(1, cores // workers)
            resources = {"num_cpus": threads}
        actor = ray.remote(**resources)(_Worker)
        self.actors = [actor.remote(load, threads) for _ in range(workers)]
        ray.get([a.ready.remote() for a in self.actors])  # load errors surface here, once

    def map(self, task: Task, trials: Sequence[Trial]) -> Iterator[tuple[int, Any]]:
        """(index, record) as each shard of trials finishes, on whichever actor is free.
        Shards are runs of consecutive trials (so a task shares prompt prefixes and decode
        steps within each), about SHARDS_PER_WORKER per actor, at most MAX_SHARD trials
        each: a run that dies loses at most the shards in flight."""
        from ray.util import ActorPool

        size = min(MAX_SHARD, max(1, math.ceil(len(trials) / (SHARDS_PER_WORKER * len(self.actors)))))
        shards = [(start, list(trials[start : start + size])) for start in range(0, len(trials), size)]
        pool = ActorPool(self.actors)
        for records in pool.map_unordered(lambda actor, shard: actor.run.remote(task, *shard), shards):
            yield from records

    def call(self, function: Callable[[Any], Any]) -> Any:
        """`function(model)` on one actor."""
        return self.ray.get(self.actors[0].call.remote(function))

    def close(self) -> None:
        if self.ray.is_initialized():  # after ray.shutdown() the actors are gone already
            for actor in self.actors:
                self.ray.kill(actor)
        self.actors = []

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Worker:
    """A Ray actor holding one model."""

    def __init__(self, load: Callable[[], Any], threads: int | None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        self.model = load()

    def ready(self) -> bool:
        return True

    def run(self, task: Task, start: int, trials: list[Trial]) -> list[tuple[int, Any]]:
        return [(start + i, record) for i, record in task(self.model, trials)]

    def call(self, function: Callable[[Any], Any]) -> Any:
        return function(self.model)
