"""The registry as the adapter service (:mod:`pema.jobs.serve_adapters`) reads it: a client, one version's
artifacts downloaded, and MLflow's errors as :data:`RegistryError`, with :func:`is_not_found` telling a version that
is not (or no longer) registered from a registry that did not answer."""
from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

RegistryError = MlflowException
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")  # MLflow's codes for "no such"


def registry_client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def is_not_found(exc: RegistryError) -> bool:
    return exc.error_code in NOT_FOUND


def download_model(tracking_uri: str, model: str) -> Path:
    """The artifacts of the registered version ``model`` (``NAME/VERSION``), downloaded to a local folder."""
    mlflow.set_tracking_uri(tracking_uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model}"))
