"""How a training body's :class:`~pema.stages.train.TrainResult` crosses a process boundary, in one place.

A Ray Train worker's only way back to the driver is the checkpoint it reports, so its result travels as a folder:
the adapter bundle in ``adapter/`` (:func:`~pema.adapter.io.save_adapter`) beside ``final.json`` (the phases, the
steps and the world size). The inline executor keeps its last checkpoint the same way, so that a body restarted
after the end hands back the same result. The stage never sees this folder: it gets the TrainResult, with
``adapter_dir`` pointing at the bundle.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pema.adapter.io import save_adapter
from pema.stages.train import TrainResult

FINAL = "final.json"  # marks a final checkpoint: the trained adapter bundle sits beside it in adapter/
BUNDLE = "adapter"


def write_result(result: TrainResult, folder: str | os.PathLike, adapter_meta: dict) -> None:
    """Write ``result`` (its in-memory adapter as a bundle with ``adapter_meta``) into ``folder``."""
    folder = Path(folder)
    save_adapter(result.adapter.cpu(), folder / BUNDLE, adapter_meta)
    metrics = {"steps_total": result.steps_total, "steps_run": result.steps_run,
               "best_val": result.phases[-1]["best_val"] if result.phases else None,
               "train_memory": result.train_memory}
    (folder / FINAL).write_text(json.dumps({"metrics": metrics, "results": list(result.phases),
                                            "world_size": result.workers}))


def is_final(folder: str | os.PathLike | None) -> bool:
    """Whether ``folder`` (a checkpoint) holds a finished training's result."""
    return folder is not None and (Path(folder) / FINAL).is_file()


def read_result(folder: str | os.PathLike) -> TrainResult:
    """The result :func:`write_result` left in ``folder``; ``adapter_dir`` is its bundle (valid while the folder is)."""
    final = json.loads((Path(folder) / FINAL).read_text())
    m = final["metrics"]
    return TrainResult(phases=tuple(final["results"]), steps_run=m["steps_run"], steps_total=m["steps_total"],
                       workers=final["world_size"], adapter_dir=str(Path(folder) / BUNDLE),
                       train_memory=m.get("train_memory"))
