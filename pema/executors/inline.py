"""The inline executor: every stage body in this process, one worker, no Ray. For tests and debugging; it runs
the same bodies the Ray executor distributes (:mod:`pema.stages`), so what the tests check is what the jobs run.

- ``encode``: the memory build's shard encoder, called on each pending shard in turn.
- ``train``: :func:`pema.stages.train.train_worker` as rank 0 of 1. Checkpoints go to
  ``<output-dir>/train_checkpoints/latest`` (stage, verify, replace); after a crash the body is restarted from it,
  up to ``train.max_failures`` times, as Ray Train restarts its workers. The body's result is kept there last, as
  on Ray Train (:mod:`pema.executors.handoff`), and handed back as a TrainResult.
- ``call``: a function call (Ray runs it as a task).
"""
from __future__ import annotations

import contextlib
import shutil

from pema.executors.handoff import is_final, read_result, write_result
from pema.formats.layout import replace_dir
from pema.stages.train import LocalTrainContext


class InlineExecutor:
    """Runs every stage body here (see the module docstring)."""

    name = "inline"

    def check_encode(self, cfg) -> None:
        pass  # one encoder, here

    def encode(self, encoder_factory, items, *, cfg):
        """Rows of every item, in order: ``encoder_factory(device)`` is called once (the PLM is loaded once)."""
        encoder = encoder_factory(cfg.resources.device)
        for item in items:
            yield from encoder(item)

    @contextlib.contextmanager
    def train(self, body, config: dict, *, cfg, layout):
        folder = layout.train_checkpoints / "latest"
        shutil.rmtree(layout.train_checkpoints, ignore_errors=True)  # a new run, as a new Ray Train fit
        ctx = LocalTrainContext(folder, cfg.resources.device)
        for attempt in range(cfg.train.max_failures + 1):
            try:
                if not is_final(ctx.folder):  # (restarted after the end: that result stands)
                    result = body(config, ctx)
                    replace_dir(folder, lambda staging: write_result(result, staging, config["adapter_meta"]))
                break
            except Exception:
                if attempt == cfg.train.max_failures:
                    raise
        yield read_result(folder)

    def call(self, fn, *args, num_cpus: float = 1, gpu: bool = False, **kwargs):
        return fn(*args, **kwargs)
