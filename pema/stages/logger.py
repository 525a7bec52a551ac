"""The metric-logger protocol every stage, training loop and decoding sweep reports through.

A stage never calls MLflow, Ray Train or Ray Tune itself; it is handed a :class:`MetricLogger`:

- :class:`pema.tracking.logger.MLflowLogger` writes the active MLflow run (or a given run, by id);
- the Ray Train worker's logger (:mod:`pema.executors.ray_train`) turns ``log_metrics(..., checkpoint=...)``
  into ``ray.train.report``; the Tune trial's (:mod:`pema.executors.ray_tune`) into ``tune.report``;
- :class:`NullLogger` drops everything, :class:`RecordingLogger` keeps it (tests, the inline executor).

``stage(name)`` opens a child scope for one stage (a child MLflow run under the pipeline's run, with the config);
``stage(name, resume=run_id)`` reopens the scope a killed job left (its run, by id); ``stage(name, scope=True)``
opens a child scope that is a part of the current stage, not a stage of its own (one system of the comparison: a
child run named ``name`` without the config; the caller logs what defines it). ``info()`` says where the logs go
(``{"run_id", "tracking_uri"}`` for MLflow, ``{}`` otherwise).

``checkpoint``, where given, is a function that writes a checkpoint into the folder it is passed; a logger that
keeps no checkpoints ignores it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, ContextManager, Mapping, Protocol

CheckpointWriter = Callable[[str], object]


class MetricLogger(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, *,
                    checkpoint: CheckpointWriter | None = None) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...

    def log_dict(self, obj: Any, name: str) -> None: ...

    def log_text(self, text: str, name: str) -> None: ...

    def log_figure(self, figure: Any, name: str) -> None: ...

    def stage(self, name: str, *, resume: str | None = None, scope: bool = False) -> ContextManager["MetricLogger"]:
        ...

    def info(self) -> dict: ...


class NullLogger:
    """Drops everything."""

    def log_metrics(self, metrics, step=None, *, checkpoint=None) -> None:
        pass

    def log_params(self, params) -> None:
        pass

    def set_tags(self, tags) -> None:
        pass

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def log_dict(self, obj, name) -> None:
        pass

    def log_text(self, text, name) -> None:
        pass

    def log_figure(self, figure, name) -> None:
        close_figure(figure)

    @contextlib.contextmanager
    def stage(self, name: str, *, resume=None, scope=False):
        yield self

    def info(self) -> dict:
        return {}


class RecordingLogger(NullLogger):
    """Keeps every call in ``calls`` as ``(method, args...)``; figures are closed, not kept."""

    def __init__(self):
        self.calls: list[tuple] = []

    def log_metrics(self, metrics, step=None, *, checkpoint=None) -> None:
        self.calls.append(("metrics", dict(metrics), step))

    def log_params(self, params) -> None:
        self.calls.append(("params", dict(params)))

    def set_tags(self, tags) -> None:
        self.calls.append(("tags", dict(tags)))

    def log_artifact(self, path, artifact_path=None) -> None:
        self.calls.append(("artifact", os.fspath(path), artifact_path))

    def log_dict(self, obj, name) -> None:
        self.calls.append(("dict", name, obj))

    def log_text(self, text, name) -> None:
        self.calls.append(("text", name, text))

    def log_figure(self, figure, name) -> None:
        close_figure(figure)
        self.calls.append(("figure", name))

    @contextlib.contextmanager
    def stage(self, name: str, *, resume=None, scope=False):
        self.calls.append(("stage", name))
        try:
            yield self
        finally:
            self.calls.append(("end", name))

    def metrics(self) -> dict[str, float]:
        """Every metric logged, the last value of each."""
        out: dict[str, float] = {}
        for call in self.calls:
            if call[0] == "metrics":
                out.update(call[1])
        return out


def close_figure(figure) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)
