"""MLflow: the tracking store and server checks (``runs``), the metric logger that writes runs (``logger``), the
Model Registry (``registry``) and the registered pyfunc model (``pyfunc_model``)."""
