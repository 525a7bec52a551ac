"""Bottom layer, with ``pema.config`` and ``pema.errors``: what is on disk and what both parties agree on.

The memory (Parquet parts + manifest), the head and adapter bundles (safetensors + JSON), the key definition, the
translation pairs and prompt templates, and the run layout (every path of an output folder). Imports nothing of
``pema`` above ``pema.config`` / ``pema.errors``.
"""
