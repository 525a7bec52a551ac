"""The thin job layer behind ``jobs/*.py``: the command line, and each job as a stage run on the Ray executor
inside its MLflow run."""
