"""The stages, each written once: build the memory, train, decode and score, compare, and the pipeline that
chains them. A stage runs on an executor (``pema.executors``: inline in one process, or Ray) and reports through a
metric logger (:mod:`pema.stages.logger`); it imports neither Ray nor MLflow.
"""
