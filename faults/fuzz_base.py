"""What the fuzzer's cases and kinds share (:mod:`faults.fuzz_cases`): the :class:`Case`, the :data:`KINDS`
registry with its :func:`kind` decorator, the valid config and the pieces the kinds build cases from. It imports
none of the kind modules, so they import it and :mod:`faults.fuzz_cases` imports them: no import cycle.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from typing import Callable

import yaml

JOBS = ("build_memory", "train", "evaluate", "pipeline", "register", "tune", "compare")
DATA_JOBS = tuple(j for j in JOBS if j != "train")  # the train job reads no JSONL and loads no PLM
BUNDLED = ("train", "evaluate", "register")  # their inputs are bundles of earlier stages: the folder holds them
DIR = "<dir>"  # a ``files`` value: a folder at that path
LOOP = "<loop>"  # a ``files`` value: a symbolic link to itself
BOM = b"\xef\xbb\xbf"
WORDS = ("the", "gold", "price", "rose", "Grüße", "naïve", "über", "straße", "café", "🙂", "日本", "rational",
         "conversation", "value", "decade", "harder", "than", "ever", "$10,000", "–", "\"quoted\"", "back\\slash")


@dataclass
class Case:
    family: str  # jsonl | config | cli
    kind: str
    job: str
    detail: str
    args: list[str]
    names: list[str]  # regexes the error line must match (the file and line, the dotted key, the option)
    files: dict[str, object] = field(default_factory=dict)  # under @IN@: bytes, a callable making them, or DIR
    out_state: str = "absent"  # absent | user (a file of the user's) | bundles (fake bundles + the user's file)
    expect: str = "error"  # error: a named error, exit 2; accept: the job gets past its checks (a valid input)
    setup: str = ""  # what the harness arranges around the case (faults.fuzz_setup): "" | holder | read_only[_parent]
    id: int = 0

    def describe(self) -> dict:
        files = {k: v if isinstance(v, str) else f"{len(v) if isinstance(v, bytes) else 'generated'} bytes"
                 for k, v in self.files.items()}
        return {"id": self.id, "family": self.family, "kind": self.kind, "job": self.job, "detail": self.detail,
                "args": self.args, "names": self.names, "files": files, "out_state": self.out_state,
                "expect": self.expect, **({"setup": self.setup} if self.setup else {})}


@dataclass(frozen=True)
class Kind:
    family: str
    name: str
    make: Callable[[random.Random, str, str], Case]
    jobs: tuple[str, ...]
    heavy: bool = False


KINDS: list[Kind] = []


def kind(family: str, name: str, jobs: tuple[str, ...] = JOBS, heavy: bool = False):
    def register(make):
        KINDS.append(Kind(family, name, make, jobs, heavy))
        return make
    return register


# ----------------------------------------------------------------------------------------------- shared pieces


def base_config() -> dict:
    """The valid config every case starts from: the smoke settings, the data in the case's inputs folder."""
    return {"model": {"model_id": "tiny://llama"},
            "data": {s: f"@IN@/{s}.jsonl" for s in ("train", "dev", "test")},
            "memory": {"rows_per_part": 256}, "adapter": {"rank": 16, "alpha": 16},
            "train": {"rct_epochs": 2, "epochs": 2, "batch_size": 64}, "decode": {"max_new_tokens": 8, "batch_size": 4}}


def dump(tree) -> bytes:
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True).encode()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))


def valid_line(rng: random.Random) -> bytes:
    obj = {"en": sentence(rng), "du": sentence(rng)}
    if rng.random() < 0.2:
        obj["id"] = rng.randint(0, 99)  # extra fields are allowed
    return json.dumps(obj, ensure_ascii=rng.random() < 0.3).encode()


def valid_jsonl(rng: random.Random, n: int = 10) -> bytes:
    return b"".join(valid_line(rng) + b"\n" for _ in range(n))


def with_defect(rng: random.Random, defect: bytes, *, bom: bool = False, first: bool = False) -> tuple[bytes, int]:
    """A JSONL file with ``defect`` as one line among valid and blank ones; returns the bytes and its line number."""
    lines = [] if first else [valid_line(rng) if rng.random() < 0.8 else rng.choice((b"", b"   ", b"\t"))
                              for _ in range(rng.randrange(0, 6))]
    lineno = len(lines) + 1
    lines += [defect] + [valid_line(rng) for _ in range(rng.randrange(0, 4))]
    eol = rng.choice((b"\n", b"\r\n"))
    return (BOM if bom else b"") + eol.join(lines) + (eol if rng.random() < 0.7 else b""), lineno


def key_re(key: str, deeper: bool = False) -> str:
    """The full dotted key, not a longer one (``decode.gu.lam`` must not match ``decode.gu.lam_max``); ``deeper``:
    or a key under it (an unknown key holding a mapping is named by its leaves: ``bogus.x``)."""
    return re.escape(key) + (r"(?!\w)" if deeper else r"(?![\w.])")


def at_line(path: str, lineno: int | None = None) -> str:
    return re.escape(path) + (rf":{lineno}(?!\d)" if lineno else r":\d+")


def job_args(job: str, config: str = "@IN@/base.yaml", out: str = "@OUT@") -> list[str]:
    return ["--config", config, "--output-dir", out, "--no-progress"] + (["--name", "m"] if job == "register" else [])


def reads(job: str, out_state: str) -> tuple[str, ...]:
    """The JSONL splits ``job`` reads (register without --dev-bleu; compare reads dev only to build a memory)."""
    return {"build_memory": ("train", "dev"), "train": (), "evaluate": ("test",), "pipeline": ("train", "dev", "test"),
            "register": ("dev",), "tune": ("train", "dev"),
            "compare": ("train", "test") if out_state == "bundles" else ("train", "dev", "test")}[job]


def jsonl(rng: random.Random, job: str, out_state: str, data, detail: str, lineno: int | None, *,
          name: str = "bad.jsonl", via: str | None = None, expect: str = "error",
          names: list[str] | None = None) -> Case:
    """A case that gives ``data`` (bytes, a callable or DIR; None: no file) as one of the splits ``job`` reads."""
    split = rng.choice(reads(job, out_state))
    path = f"@IN@/{name}"
    via = via or rng.choice(("flag", "override"))
    extra = [f"--{split}", path] if via == "flag" else [f"data.{split}={path}"]
    names = names if names is not None else [at_line(path, lineno) if lineno else re.escape(path)]
    return Case("jsonl", "", job, f"{split} via {via}: {detail}", job_args(job) + extra, names,
                {} if data is None else {name: data}, expect=expect)


def set_dotted(tree: dict, key: str, value) -> dict:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
    return tree


def yaml_value(value) -> str:
    """``value`` as the text of a ``key=value`` override (YAML; JSON is YAML except for the non-finite floats)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if value != value else (".inf" if value > 0 else "-.inf")
    return json.dumps(value, ensure_ascii=False)


def config_value(rng: random.Random, job: str, key: str, value, detail: str, names: list[str] | None = None) -> Case:
    """``key: value`` in the YAML file given as --config, or as a ``key=value`` override (seeded)."""
    names = names or [key_re(key, deeper=isinstance(value, dict))]
    if rng.random() < 0.5:
        return Case("config", "", job, f"in the YAML file: {key}: {value!r} ({detail})",
                    job_args(job, "@IN@/cfg.yaml"), names, {"cfg.yaml": dump(set_dotted(base_config(), key, value))})
    return Case("config", "", job, f"override: {key}={yaml_value(value)} ({detail})",
                job_args(job) + [f"{key}={yaml_value(value)}"], names)


def config_text(job: str, text: bytes, detail: str, names: list[str] | None = None, expect: str = "error") -> Case:
    """The YAML file given as --config is ``text``; its error names the file and a line by default."""
    return Case("config", "", job, detail, job_args(job, "@IN@/cfg.yaml"),
                [at_line("@IN@/cfg.yaml")] if names is None else names, {"cfg.yaml": text}, expect=expect)


def bomb(levels: int = 9, width: int = 9, mapping: bool = False) -> str:
    """A flow sequence of anchored lists (or mappings), each holding ``width`` aliases of the one before: its last
    item expands to ``width ** levels`` leaves ("billion laughs")."""
    items, prev = [], None
    for i in range(levels):
        name = f"l{i}"
        leaves = ["lol"] * width if prev is None else [f"*{prev}"] * width
        body = "{" + ", ".join(f"k{j}: {v}" for j, v in enumerate(leaves)) + "}" if mapping else \
            "[" + ", ".join(leaves) + "]"
        items.append(f"&{name} {body}")
        prev = name
    return "[" + ", ".join(items) + "]"
