"""Training on Ray Train: a TorchTrainer runs :func:`pema.stages.train.train_worker` on ``resources.train_workers``
data-parallel workers (DDP over gloo on CPUs, NCCL on GPUs). The body is the stage's; this module only gives it a
context: the worker's rank, world size and device, Ray Train's last checkpoint after a restart
(``train.max_failures``), and a logger whose ``log_metrics(..., checkpoint=...)`` is ``ray.train.report``. The
body's :class:`~pema.stages.train.TrainResult` comes back as the last reported checkpoint
(:mod:`pema.executors.handoff`); :func:`train_on_ray` yields it read back.
"""
from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
import time

import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pema.errors import full_disk
from pema.executors.handoff import is_final, read_result, write_result
from pema.executors.ray_progress import bars_on_driver, relayed_bars
from pema.stages.logger import NullLogger


class RayTrainLogger(NullLogger):
    """``log_metrics`` is ``ray.train.report`` (a barrier: every rank calls it); on rank 0 the checkpoint writer
    fills the reported checkpoint's folder, the other ranks report none."""

    def __init__(self, rank: int):
        self.rank = rank

    def log_metrics(self, metrics, step=None, *, checkpoint=None) -> None:
        _report(self.rank, metrics, checkpoint)


def _report(rank: int, metrics, checkpoint=None) -> None:
    """``ray.train.report`` on every rank; rank 0's ``checkpoint(folder)`` fills the reported checkpoint."""
    if checkpoint is None or rank != 0:
        ray.train.report(dict(metrics), checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint(tmp)
        ray.train.report(dict(metrics), checkpoint=Checkpoint.from_directory(tmp))


class RayTrainContext:
    def __init__(self, device: str):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if device.startswith("cuda") else torch.device("cpu")
        self.logger = RayTrainLogger(self.rank)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        latest = ray.train.get_checkpoint()
        if latest is None:
            yield None
            return
        with latest.as_directory() as d:
            yield d


@ray.remote(num_cpus=0)
class NoRoomSeen:
    """Where the workers note the first write that failed for want of space. Ray Train restarts a failed worker
    group (``train.max_failures``), and the error it raises in the end may be another (a restart that lost its
    placement group), without the worker's OSError."""

    def __init__(self):
        self.seen = None

    def note(self, seen: tuple) -> None:
        self.seen = self.seen or seen

    def first(self) -> tuple | None:
        return self.seen


def _loop(body, config: dict) -> None:
    ctx = RayTrainContext(config["device"])
    with relayed_bars(config.get("relay"), f"rank {ctx.rank}"):
        try:
            with ctx.latest_checkpoint() as d:
                if is_final(d):  # restarted after the end: report the same result again
                    _report(ctx.rank, {"done": True, "steps_run": 0},
                            lambda tmp: shutil.copytree(d, tmp, dirs_exist_ok=True))
                    return
            result = body({k: v for k, v in config.items() if k not in ("relay", "no_room")}, ctx)
            if result is not None:  # the result's way back: the last reported checkpoint
                _report(ctx.rank, {"done": True, "steps_run": result.steps_run, "steps_total": result.steps_total},
                        lambda tmp: write_result(result, tmp, config["adapter_meta"]))
        except Exception as exc:
            if (disk := full_disk(exc)) is not None and config.get("no_room") is not None:
                filename = None if disk.filename is None else str(disk.filename)
                ray.get(config["no_room"].note.remote((disk.errno, disk.strerror, filename)))
            raise


@contextlib.contextmanager
def train_on_ray(body, config: dict, *, cfg, layout, run_name: str = "train", progress: bool = True):
    """Run ``body(config, ctx)`` on Ray Train; yields its TrainResult (``adapter_dir`` inside the final
    checkpoint, valid while the context is open). With ``progress`` the
    workers' bars are redrawn on this console. A write that fails for want of space (a worker's, or the
    controller's) comes out as that OSError, naming the file or else Ray Train's folder (:func:`_no_room`)."""
    t, r = cfg.train, cfg.resources
    use_gpu = r.device.startswith("cuda")
    no_room = NoRoomSeen.remote()
    try:
        with bars_on_driver(progress and config.get("progress", False)) as relay:
            for folder in _fit(body, {**config, "device": r.device, "relay": relay, "no_room": no_room}, t, r,
                               use_gpu, layout, run_name):
                yield read_result(folder)
    finally:
        ray.kill(no_room)


def fit_in_thread(trainer):
    """``trainer.fit()`` in a helper thread, the driver's main thread waiting on it. Called from the main thread,
    Ray Train installs a SIGINT handler of its own that outlives ``fit()`` and turns Ctrl+C into a "graceful abort"
    that returns as if training had ended; from another thread it installs none, so the job's own handlers
    (:mod:`pema.jobs.guard`) stay in force: a signal raises in the main thread, the job unwinds and Ray's shutdown
    at exit takes the training actors with it."""
    import threading

    done: dict = {}

    def target():
        try:
            done["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            done["error"] = exc

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in done:
        raise done["error"]
    return done["result"]


def _no_room(error, layout, seen=None) -> OSError | None:
    """A full disk behind Ray Train's error, or noted by a worker in ``seen`` (:class:`NoRoomSeen`), as an OSError
    naming the file, or else Ray Train's folder (pyarrow's error, writing the checkpoints, names none); not retried:
    the job exits 2 naming it. None for any other error."""
    disk = full_disk(error)
    if disk is None and seen is not None and (noted := ray.get(seen.first.remote())) is not None:
        disk = OSError(*noted)
    return None if disk is None else OSError(disk.errno, disk.strerror, disk.filename or str(layout.ray_train))


CONTROLLER_RETRIES = 2  # whole-run restarts after a controller error (the worker group lost outside a step)


def _fit(body, config, t, r, use_gpu, layout, run_name):
    for attempt in range(CONTROLLER_RETRIES + 1):
        trainer = TorchTrainer(
            functools.partial(_loop, body), train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=r.train_workers, use_gpu=use_gpu, resources_per_worker={
                "CPU": r.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
            run_config=RunConfig(name=run_name, storage_path=str(layout.ray_train),
                                 failure_config=FailureConfig(max_failures=t.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)))
        try:
            result = fit_in_thread(trainer)
        except Exception as exc:  # Ray Train raises the run's error from fit()
            if (disk := _no_room(exc, layout, config.get("no_room"))) is not None:
                raise disk from exc
            if not isinstance(exc, ControllerError) or attempt == CONTROLLER_RETRIES:
                raise
            time.sleep(2.0 * (attempt + 1))  # a controller error raised rather than returned: retried the same way
            continue
        if result.error is not None and (disk := _no_room(result.error, layout, config.get("no_room"))) is not None:
            raise disk from result.error
        # Ray Train retries failed workers (train.max_failures), not a controller that lost its worker group
        # (seen when a job is rerun right after its driver was killed, while Ray removes the old job's placement
        # groups): the run starts again from its last checkpoint, which the workers resume from
        if not isinstance(result.error, ControllerError) or attempt == CONTROLLER_RETRIES:
            break
        time.sleep(2.0 * (attempt + 1))
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d:
        yield d
