"""The memory build's encoding on Ray Data: a fixed pool of actors (one per GPU group, or ``resources.memory_actors``),
each loading the PLM once and running the stage's :class:`~pema.stages.build.ShardEncoder` on the shards it is
given. The plan, the resume and the writing of parts are the stage's (:mod:`pema.stages.build`); this module only
moves shards to actors and rows back to the driver, and counts the rows the actors have encoded (a zero-CPU
counter actor) so that the driver's row bar moves between the blocks Ray Data hands over. One line of Ray's is
kept off the console (:data:`RESTART_WARNING`, :func:`dropped_lines`): an error-level warning that the restart of
such actors could fail, which for these actors it cannot.
"""
from __future__ import annotations

import contextlib
import os
import queue
import re
import sys
import threading

import numpy as np
import ray

from pema.config import ResourcesConfig
from pema.errors import ConfigError

BLOCK_BYTES = 4 << 20  # rows come back in blocks of about 4 MiB
# Ray's core worker logs this at error level, once per process, when it creates an actor that may restart
# (max_restarts != 0) with an argument in the object store: Ray Data always passes its map function so, and its
# actors restart (Ray Data's default, max_restarts=-1, which replaces a dead encoder: test_server_faults). Here the
# ref lives as long as the dataset, so the restart works and the line warns of nothing.
RESTART_WARNING = re.compile(rb"[^\r\n]*\bcore_worker\.cc:\d+: Actor with class name: '[^'\n]*' and ID: '[0-9a-f]+' has "
                             rb"constructor arguments in the object store and max_restarts > 0\.[^\r\n]*\n?")


@ray.remote(num_cpus=0)
class _RowCounter:
    def __init__(self):
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += n

    def total(self) -> int:
        return self.rows


class _EncodeActor:
    def __init__(self, factory, counter):
        gpus = len(ray.get_gpu_ids())
        self.encode, self.counter = factory("cpu" if gpus == 0 else ("cuda" if gpus == 1 else "auto")), counter

    def __call__(self, batch: dict[str, np.ndarray]):
        for memory, shard, payload in zip(batch["memory"], batch["shard"], batch["batches"]):
            for rows in self.encode({"memory": int(memory), "shard": int(shard), "batches": payload}):
                self.counter.add.remote(len(rows["token"]))  # the driver's bar moves as rows are encoded
                yield rows


def actor_resources(r: ResourcesConfig, resources: dict) -> tuple[int, int]:
    """``(actors, gpus per actor)`` for a cluster with ``resources``; ConfigError when they cannot all start."""
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    per_gpu = r.gpus_per_actor if gpus else 0
    n = r.memory_actors or (max(1, gpus // r.gpus_per_actor) if gpus else 1)
    if n * per_gpu > gpus:
        raise ConfigError(f"resources.memory_actors={n} x resources.gpus_per_actor={per_gpu} needs {n * per_gpu} "
                          f"GPUs but the cluster has {gpus}; lower them")
    if n * r.cpus_per_actor > cpus:
        raise ConfigError(f"resources.memory_actors={n} x resources.cpus_per_actor={r.cpus_per_actor:g} needs "
                          f"{n * r.cpus_per_actor:g} CPUs but the cluster has {cpus:g}; lower them")
    return n, per_gpu


@contextlib.contextmanager
def dropped_lines(pattern: re.Pattern):
    """While the block runs, what is written to file descriptor 2 (where Ray's C++ log lines go, past
    ``sys.stderr``) passes through a pipe at once, partial lines too (the bars' redraws), less the lines that match
    ``pattern``; a line Ray writes is one write() of under PIPE_BUF bytes, so it is never split."""
    sys.stderr.flush()
    saved = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def forward():
        with contextlib.suppress(OSError):  # closed below if a child process still held the pipe after 5 s
            while chunk := os.read(read, 1 << 16):
                os.write(saved, pattern.sub(b"", chunk))

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end: the forwarder drains it and ends
        thread.join(5)
        os.close(read)
        os.close(saved)


def encode_on_ray(factory, items: list[dict], *, cfg, poll_s: float = 0.5):
    """Rows of every item (a shard), encoded by a pool of Ray Data actors, as they arrive (any order). Ray Data
    hands rows over in blocks of about ``BLOCK_BYTES``; in between, every ``poll_s`` this yields ``{"encoded": n}``,
    the rows the actors have encoded so far, for the progress bar."""
    n_actors, gpus = actor_resources(cfg.resources, ray.cluster_resources())
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds.context.target_max_block_size = BLOCK_BYTES
    ds.context.enable_progress_bars = False  # the stage's row bar replaces Ray Data's operator bars
    ds.context.enable_operator_progress_bars = False
    counter = _RowCounter.remote()
    ds = ds.map_batches(_EncodeActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(n_actors, len(items))),
                        num_gpus=gpus, num_cpus=cfg.resources.cpus_per_actor,
                        fn_constructor_kwargs={"factory": factory, "counter": counter})
    arrived: queue.Queue = queue.Queue()

    def pump():
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                arrived.put(("rows", batch))
            arrived.put(("end", None))
        except BaseException as exc:  # re-raised in the caller's thread
            arrived.put(("error", exc))

    with dropped_lines(RESTART_WARNING):  # the actors start (and Ray logs that line) once the pump iterates
        threading.Thread(target=pump, daemon=True).start()
        yield from _arrivals(arrived, counter, poll_s)


def _arrivals(arrived: queue.Queue, counter, poll_s: float):
    try:
        while True:
            try:
                kind, item = arrived.get(timeout=poll_s)
            except queue.Empty:
                yield {"encoded": ray.get(counter.total.remote())}
                continue
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        ray.kill(counter)
