"""Run pipeline cases on Ray actors: a local Ray started here (127.0.0.1 only, no dashboard), or a cluster.

Each actor is a :class:`~analyses.pipelines.runner.CaseWorker`: it loads the model once and runs many
cases. Results come back to this process, which alone writes the result files, so the output folder
only has to exist on the driver; the cases' input files must be readable at the same paths on the
workers (a shared file system, or the same machine).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["RayRun", "gpus_per_actor"]

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
INSTALL_HINT = "Ray is not installed; `pip install \"hooked-vlm[ray]\"` (or run without --workers / --ray-address)."


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return ray


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables while Ray starts its processes (they inherit them), then restore them."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Start a local Ray whose GCS, raylet and workers listen on 127.0.0.1 only.

    On Linux Ray advertises (and its servers listen on) the machine's network address; with clusters
    "disabled" (its macOS / Windows mode, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) it uses the loopback
    address instead. The variable is read at import (this process) and by the processes Ray starts.
    """
    from ray._private import ray_constants

    old_flag = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with _environ(**{LOOPBACK_ENV: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag


def gpus_per_actor(device: str, cluster_gpus: float, actors: int) -> float:
    """GPUs each actor asks Ray for: 0 on CPU; one each, or an equal share when actors outnumber GPUs.

    Ray sets ``CUDA_VISIBLE_DEVICES`` per actor, so actors use ``cuda`` (their first visible device).
    """
    if not device.startswith("cuda"):
        return 0.0
    if cluster_gpus <= 0:
        raise RuntimeError(f"--device {device} was asked for, but the Ray cluster has no GPU; use --device cpu or add GPU nodes.")
    return min(1.0, cluster_gpus / actors)


class RayRun:
    """A set of Ray actors running cases; starts (and later stops) a local Ray when none is running."""

    def __init__(self, worker_args: tuple, workers: int, address: str | None, device: str) -> None:
        self.worker_args, self.address, self.device = worker_args, address, device
        self.requested = workers
        self.started_ray = False
        self.actors: list[Any] = []
        self.pids: list[int] = []
        self.node_ip: str | None = None

    def start(self) -> str:
        ray = _import_ray()
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, logging_level="WARNING")
            else:
                # workers import what this process imports (e.g. a pipeline defined in a script's folder)
                path = os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""), *sys.path] if p and os.path.isdir(p))
                with _loopback_only(), _environ(PYTHONPATH=path):
                    ray.init(num_cpus=max(self.requested, 1), include_dashboard=False, logging_level="WARNING")
            self.started_ray = True
        self.node_ip = ray.util.get_node_ip_address()
        from analyses.pipelines.runner import CaseWorker

        n = self.requested if self.requested > 0 else max(int(ray.cluster_resources().get("CPU", 1)), 1)
        gpus = gpus_per_actor(self.device, ray.cluster_resources().get("GPU", 0.0), n)
        actor_class = ray.remote(num_cpus=1, num_gpus=gpus)(CaseWorker)
        self.actors = [actor_class.remote(*self.worker_args) for _ in range(n)]
        fingerprints = ray.get([a.fingerprint.remote() for a in self.actors])
        self.pids = ray.get([a.pid.remote() for a in self.actors])
        if len(set(fingerprints)) != 1:
            raise RuntimeError(
                f"Ray workers loaded different models (fingerprints {sorted(set(fingerprints))}); the checkpoint path "
                "must hold the same files on every node."
            )
        return fingerprints[0]

    def map(self, cases: Sequence[Any]) -> Iterator[dict[str, Any]]:
        """Outcomes of ``cases`` as they finish (one case at a time per actor)."""
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        return pool.map_unordered(lambda actor, case: actor.run.remote(case), list(cases))

    def stop(self) -> None:
        ray = _import_ray()
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    def describe(self) -> dict[str, Any]:
        return {"backend": "ray", "address": self.address or "local", "workers": len(self.pids), "worker_pids": self.pids,
                "node_ip": self.node_ip}
