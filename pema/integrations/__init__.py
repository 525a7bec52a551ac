"""Ray and MLflow glue around the Ray-free core. Core modules (``pema.adapter``, ``pema.owner``, ``pema.memory``,
...) never import this package; jobs and tests do."""
