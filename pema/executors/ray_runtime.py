"""Connecting to Ray the same way from every job.

- Under ``ray job submit`` (``RAY_ADDRESS`` set by Ray) or with ``--address``: connect to that cluster.
- Otherwise: start a new local cluster in this process (``make run``), stopped when the job ends. It never attaches
  to another cluster that happens to run on the machine.

``RAY_AUTH_MODE`` is set to ``disabled`` unless the user set it: a local ``ray.init()`` would otherwise turn token
auth on and write ``~/.ray/auth_token``, after which ``ray job submit`` to a ``ray start`` cluster fails with
"Missing authentication token" (DESIGN.md section 4). Set ``RAY_AUTH_MODE=token`` yourself to use tokens.
"""
from __future__ import annotations

import logging
import os

import ray

AUTH_MODE_DEFAULT = "disabled"
QUIET_LOGGERS = ("ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow")  # their INFO/WARNING lines are off without --verbose


def init_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = False) -> dict:
    """Connect to (or start) Ray once per process; returns the cluster's resources."""
    os.environ.setdefault("RAY_AUTH_MODE", AUTH_MODE_DEFAULT)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        kwargs = {"log_to_driver": not quiet}
        if quiet:  # Ray's own driver-side lines too (the workers' bars reach the console through ray_progress)
            kwargs.update(logging_level=logging.WARNING, configure_logging=True)
            for name in QUIET_LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR)
        if address is None:  # a new local cluster ("local": never attach to whatever cluster happens to run here),
            address = "local"  # with at least 4 logical CPUs, so 2-CPU stages fit beside Ray's own tasks
            kwargs["num_cpus"] = num_cpus or max(4, os.cpu_count() or 1)
        ray.init(address=address, **kwargs)
    return ray.cluster_resources()


def cluster_gpus() -> int:
    """GPUs in the connected cluster (0 on a CPU-only cluster)."""
    return int(ray.cluster_resources().get("GPU", 0))
