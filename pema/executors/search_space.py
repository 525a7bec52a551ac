"""Search spaces as data (``tune_spaces/*.yaml``), keyed by config field names and checked against the config.

An entry is ``field.path: {kind: args}`` with kind ``choice`` (a list of values), ``uniform`` / ``loguniform``
(``[low, high]``) or ``randint`` (``[low, high)``). Loading checks that every key names a config field and that
every value the entry can produce (each choice, both bounds) gives a valid config, so a typo or an out-of-range
bound fails before any trial starts. :func:`to_tune` turns a space into Ray Tune domains.
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from pema.config import PipelineConfig, flatten, load_config
from pema.errors import ConfigError
from pema.formats.yaml_safe import load_yaml_file

KINDS = ("choice", "uniform", "loguniform", "randint")


def _probe_values(key: str, kind: str, args) -> list:
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"search space {key}: 'choice' needs a non-empty list, got {args!r}")
        return args
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
            and args[0] < args[1]):
        raise ConfigError(f"search space {key}: {kind!r} needs [low, high] with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"search space {key}: 'loguniform' needs low > 0, got {args[0]!r}")
    return [args[0], args[1] - 1] if kind == "randint" else list(args)


def load_space(path: str | Path, base: str | Path | None = None) -> dict[str, tuple[str, object]]:
    """``{field: (kind, args)}`` from a YAML file, validated against the config (``base`` YAML, or defaults)."""
    data = load_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a search space must be a mapping of config fields to distributions")
    fields = set(flatten(PipelineConfig()))
    space = {}
    for key, spec in data.items():
        if key not in fields:
            raise ConfigError(f"{path}: {key!r} is not a config field; fields look like 'adapter.rank', "
                              "'train.kappa', 'decode.pema.lam_max'")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"{path}: {key} must be one of {{kind: args}} with kind in {KINDS}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        try:
            values = _probe_values(key, kind, args)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        for value in values:
            load_config(base, [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
        space[key] = (kind, args)
    return space


def to_tune(space: dict[str, tuple[str, object]]) -> dict:
    """Ray Tune domains for a loaded space (``tune.choice``, ``tune.uniform``, ...)."""
    from ray import tune

    make = {"choice": lambda a: tune.choice(a), "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    return {key: make[kind](args) for key, (kind, args) in space.items()}


def decode_grid(space: dict[str, tuple[str, object]], samples: int = 0, seed: int = 0) -> list[dict[str, object]]:
    """The decoding settings to try with each trained adapter: ``[{field: value}, ...]``.

    ``samples == 0``: every combination (each entry must be a ``choice``); otherwise ``samples`` draws from the
    space. Settings that a schedule kind ignores are dropped (a constant schedule has no ``lam_max`` / ``floor``,
    Gradual Unrolling no ``lam``; ``stop_lam`` applies to every kind), so duplicates collapse; the order is fixed
    by ``seed``. A ``choice`` may hold ``null`` (``None``) for an optional field such as ``stop_lam``."""
    import itertools
    import random

    rng = random.Random(seed)
    if samples == 0:
        open_ended = [k for k, (kind, _) in space.items() if kind != "choice"]
        if open_ended:
            raise ConfigError(f"a full decoding grid needs 'choice' entries only; {open_ended} are continuous: "
                              "give a number of samples instead")
        keys = list(space)
        points = [dict(zip(keys, values)) for values in itertools.product(*(space[k][1] for k in keys))]
    else:
        draw = {"choice": lambda a: rng.choice(a), "uniform": lambda a: rng.uniform(*a),
                "loguniform": lambda a: math.exp(rng.uniform(math.log(a[0]), math.log(a[1]))),
                "randint": lambda a: rng.randrange(*a)}
        points = [{k: draw[kind](args) for k, (kind, args) in space.items()} for _ in range(samples * 20)]
    unique: dict[tuple, dict] = {}
    for point in points:
        canonical = {k: v for k, v in point.items() if not _ignored(k, point)}
        unique.setdefault(tuple(sorted(canonical.items())), canonical)
    grid = list(unique.values())
    if samples:
        grid = grid[:samples]
    return grid


def _ignored(key: str, point: dict) -> bool:
    """True when ``key`` has no effect under the schedule kind that ``point`` selects for the same schedule."""
    section, _, name = key.rpartition(".")
    kind = point.get(f"{section}.kind")
    if kind is None or not section.startswith("decode."):
        return False
    return name in (("lam_max", "floor") if kind == "constant" else ("lam",))
