"""Hostile inputs for the jobs, drawn from a seed (issue 14, item 3): JSONL files, configs and command lines.

A :class:`Case` is one job's command line (after the script name), the files it reads and the regexes its error must
match (the file and line, or the full dotted key). ``@IN@`` (the case's inputs folder) and ``@OUT@`` (its
``--output-dir``) are filled in by the harness (:mod:`faults.fuzz_inputs`); in ``names`` they stand for the escaped
path. Every inputs folder also holds a valid ``base.yaml``, ``{train,dev,test}.jsonl`` and ``notes.txt``.

The pieces the kinds share are in :mod:`faults.fuzz_base`; the kinds themselves in :mod:`faults.fuzz_kinds`,
:mod:`faults.fuzz_kinds_cli` and :mod:`faults.fuzz_kinds_user`, which this module imports (in that order: the order
of :data:`KINDS`, which the seed's draw depends on). Import the kinds through this module.

:func:`generate` walks every kind of case in a seeded order (each kind once per round) and spreads the jobs over
them, so a sample of ``len(KINDS)`` cases covers every kind and every job.
"""
from __future__ import annotations

import random
from collections import deque

from faults import fuzz_kinds, fuzz_kinds_cli, fuzz_kinds_user  # noqa: F401  (importing them registers the kinds)
from faults.fuzz_base import (BUNDLED, DIR, JOBS, KINDS, LOOP, Case, Kind, base_config, bomb, dump, job_args,
                              valid_jsonl)

__all__ = ["DIR", "JOBS", "KINDS", "LOOP", "Case", "base_config", "bomb", "dump", "generate", "job_args",
           "valid_jsonl"]


def generate(seed: int, count: int, *, heavy: bool = True, families: tuple[str, ...] | None = None,
             jobs: tuple[str, ...] = JOBS, kinds: tuple[str, ...] | None = None) -> list[Case]:
    """``count`` cases from ``seed``: the kinds in a shuffled round (each once per round), the jobs in rotation;
    ``kinds``: only these (by name)."""
    if kinds is not None and (unknown := set(kinds) - {k.name for k in KINDS}):
        raise ValueError(f"unknown kinds {sorted(unknown)}; choose from {sorted({k.name for k in KINDS})}")
    rng = random.Random(seed)
    kinds = [k for k in KINDS if (heavy or not k.heavy) and (families is None or k.family in families)
             and set(k.jobs) & set(jobs) and (kinds is None or k.name in kinds)]
    order: list[Kind] = []
    rota = deque(rng.sample(jobs, len(jobs)))
    cases = []
    while kinds and len(cases) < count:
        if not order:
            order = rng.sample(kinds, len(kinds))
        k = order.pop()
        job = next(j for j in rota if j in k.jobs)
        rota.remove(job)
        rota.append(job)
        out_state = "bundles" if job in BUNDLED else rng.choice(("absent", "user", "bundles"))
        case = k.make(rng, job, out_state)
        case.id, case.family, case.kind, case.job, case.out_state = len(cases), k.family, k.name, job, out_state
        cases.append(case)
    return cases
