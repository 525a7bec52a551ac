"""The metric logger (:class:`pema.stages.logger.MetricLogger`) on MLflow.

- :class:`MLflowLogger` writes the process's active run; ``stage(name)`` opens a stage run
  (:func:`~pema.tracking.runs.stage_run`: a child of the active run, params, config, lineage tags; ``resume``:
  the run of that id, reopened) and yields the logger of that run; ``stage(name, scope=True)`` a plain child run
  named ``name`` with the lineage tags only (one system of the comparison).
- :class:`ClientRunLogger` writes one run by id through an ``MlflowClient`` (no process-global active run): a Ray
  Tune trial's run. :class:`TrialRuns` (picklable, so it travels to the trials) creates them as children of the
  tune job's run, or reopens one when a trial resumes.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pema.config import flatten
from pema.stages.logger import close_figure
from pema.tracking.orphans import process_tags
from pema.tracking.runs import PARAM_MAX, experiment_id, lineage_tags, stage_run


class MLflowLogger:
    def __init__(self, cfg, output_dir):
        self.cfg, self.output_dir = cfg, output_dir

    def log_metrics(self, metrics, step=None, *, checkpoint=None) -> None:
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if not isinstance(v, (str, bool))}, step=step)

    def log_params(self, params) -> None:
        mlflow.log_params({k: str(v)[:PARAM_MAX] for k, v in params.items()})

    def set_tags(self, tags) -> None:
        mlflow.set_tags(dict(tags))

    def log_artifact(self, path, artifact_path=None) -> None:
        if Path(path).is_dir():
            mlflow.log_artifacts(os.fspath(path), artifact_path)
        else:
            mlflow.log_artifact(os.fspath(path), artifact_path)

    def log_dict(self, obj, name) -> None:
        mlflow.log_dict(obj, name)

    def log_text(self, text, name) -> None:
        mlflow.log_text(text, name)

    def log_figure(self, figure, name) -> None:
        mlflow.log_figure(figure, name)
        close_figure(figure)

    @contextlib.contextmanager
    def stage(self, name: str, *, resume: str | None = None, scope: bool = False):
        if scope:  # a part of the active run's stage: a child run without the config of a stage run
            parent = mlflow.active_run()
            with mlflow.start_run(run_name=name, nested=True, experiment_id=parent.info.experiment_id if parent
                                  else experiment_id(output_dir=self.output_dir)):
                mlflow.set_tags(lineage_tags(self.cfg, self.output_dir))
                yield MLflowLogger(self.cfg, self.output_dir)
            return
        with stage_run(name, self.cfg, self.output_dir, run_id=resume):
            yield MLflowLogger(self.cfg, self.output_dir)

    def info(self) -> dict:
        run = mlflow.active_run()
        return {"run_id": run.info.run_id, "tracking_uri": mlflow.get_tracking_uri()} if run else {}


class ClientRunLogger:
    """One run, written through a client."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client, self.run_id, self.tracking_uri = MlflowClient(tracking_uri=tracking_uri), run_id, tracking_uri

    def log_metrics(self, metrics, step=None, *, checkpoint=None) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                                                    if not isinstance(v, (str, bool))])

    def log_params(self, params) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:PARAM_MAX]) for k, v in params.items()])

    def set_tags(self, tags) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path, artifact_path=None) -> None:
        self.client.log_artifact(self.run_id, os.fspath(path), artifact_path)

    def log_dict(self, obj, name) -> None:
        self.client.log_dict(self.run_id, obj, name)

    def log_text(self, text, name) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_figure(self, figure, name) -> None:
        self.client.log_figure(self.run_id, figure, name)
        close_figure(figure)

    @contextlib.contextmanager
    def stage(self, name: str, *, resume=None, scope=False):
        yield self

    def info(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.tracking_uri}

    def end(self, status: str = "FINISHED", **tags) -> None:
        self.set_tags(tags)
        self.client.set_terminated(self.run_id, status)


class TrialRuns:
    """Opens the MLflow run of a Ray Tune trial: a child of the tune job's run (``mlflow.parentRunId``) with the
    trial's config as params and its sampled values as the ``pema.search`` tag."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, lineage: dict):
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.parent_run_id, self.lineage = parent_run_id, lineage

    @classmethod
    def under_active_run(cls, cfg, output_dir) -> "TrialRuns":
        """The trials' runs as children of the active run (the tune job's), with the lineage tags of ``cfg``."""
        parent = mlflow.active_run()
        return cls(mlflow.get_tracking_uri(), parent.info.experiment_id, parent.info.run_id,
                   lineage_tags(cfg, output_dir))

    def open(self, trial_id: str, overrides: dict, cfg, run_id: str | None = None) -> ClientRunLogger:
        client = MlflowClient(tracking_uri=self.tracking_uri)
        if run_id is None:
            run_id = client.create_run(self.experiment_id, run_name=f"trial_{trial_id}", tags={
                "mlflow.parentRunId": self.parent_run_id, "pema.stage": "tune_trial", "pema.trial_id": trial_id,
                **self.lineage, **process_tags()}).info.run_id
            run = ClientRunLogger(self.tracking_uri, run_id)
            run.log_params(flatten(cfg))
            run.set_tags({"pema.search": json.dumps(overrides)})
            return run
        client.update_run(run_id, status="RUNNING")  # a trial resumed after an interruption goes on in its run
        for key, value in process_tags().items():  # held by this process now
            client.set_tag(run_id, key, value)
        return ClientRunLogger(self.tracking_uri, run_id)

    def close_if_running(self, run_id: str, status: str, trial_status: str) -> None:
        """End a trial's run that was left RUNNING (pruned, failed, or completed and then stopped by Tune after a
        resume reopened it), tagged with ``pema.trial_status``."""
        client = MlflowClient(tracking_uri=self.tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "pema.trial_status", trial_status)
            client.set_terminated(run_id, status)
