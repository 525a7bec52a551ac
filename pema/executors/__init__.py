"""Executors: where a stage's body runs. ``inline`` runs it in this process (tests, debugging); the ``ray_*``
modules run the same body on Ray Data actors (memory build), Ray Train workers (training), Ray tasks (decoding)
and Ray Tune trials (the search)."""
