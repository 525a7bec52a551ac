"""Is this stage done? The one answer, for every job: ``<output_dir>/stages.json`` and :func:`gated`.

A stage that completes records, inside its run and before the run ends:

- the digest of the config it ran with (every section but ``resources``, which changes where a stage runs, not
  what it makes, and but the data paths, which the inputs stand for) and the config itself, flattened;
- its inputs (:func:`stage_inputs`): the sha256 of the content of every JSONL file it read, the model's files
  (name, size, modification time) and the bundles it read from the folder;
- its result and its MLflow run id.

The same command run again skips a stage whose entry matches its config and its inputs and whose outputs are in
place, and hands back the recorded result; otherwise the stage runs again, and the console says why: the config
keys that changed, the input whose content changed, an output that is gone. So a data file changed under the same
path is read again, and a job killed after a stage's work was done does not run that stage a second time (each
stage keeps one finished run: the jobs layer ends a recorded run that the kill left open as FINISHED).

A stage that runs again drops the entries of the stages after it, which read its outputs. A missing or unreadable
ledger means nothing is done: stages rerun and resume from their own state (memory parts, training checkpoints).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

from pema.config import PipelineConfig, flatten, to_dict
from pema.formats.layout import ADAPTER_BUNDLES, OWNER_BUNDLES, SNAPSHOTS, SOURCES, RunLayout, write_text_atomic
from pema.stages.decode import SYSTEMS

LEDGER = "stages.json"
NOT_DONE = "not done before in this folder"
PREDICTIONS = tuple(f"predictions/{system}.jsonl" for system in SYSTEMS)
OUTPUTS = {"build_memory": OWNER_BUNDLES, "train": ADAPTER_BUNDLES, "evaluate": PREDICTIONS,
           "pipeline": OWNER_BUNDLES + ADAPTER_BUNDLES + PREDICTIONS + ("summary.json",), "register": ADAPTER_BUNDLES,
           "compare": OWNER_BUNDLES + ("summary.json",)}
DOWNSTREAM = {"build_memory": ("train", "evaluate", "register", "pipeline", "compare"), "train": ("evaluate",
              "register", "pipeline"), "evaluate": ("pipeline",), "register": (), "pipeline": (), "compare": ()}
DATA_PATHS = ("data.train", "data.dev", "data.test", "data.ood_test")  # the inputs stand for them
PARTS = {"pipeline": ("build_memory", "train", "evaluate")}  # the stages a skipped stage's run holds
ALL_SPLITS = ("train", "dev", "test", "ood_test")
# what each stage reads: the JSONL splits (hygiene cleans a split against the earlier ones, so a split's pairs
# depend on those too), whether it loads the PLM, and the bundles of the folder
READS = {"build_memory": (("train", "dev"), True, ()),
         "train": ((), False, OWNER_BUNDLES),
         "evaluate": (ALL_SPLITS, True, OWNER_BUNDLES + ADAPTER_BUNDLES),
         "pipeline": (ALL_SPLITS, True, ()),
         "register": (("train", "dev"), True, ADAPTER_BUNDLES),
         "compare": (ALL_SPLITS, True, ())}


def _config_tree(cfg: PipelineConfig) -> dict:
    tree = {k: v for k, v in flatten(cfg).items() if not k.startswith("resources.") and k not in DATA_PATHS}
    return json.loads(json.dumps(tree, default=str))  # as the ledger keeps it: tuples are lists


def config_digest(cfg: PipelineConfig) -> str:
    return hashlib.sha256(json.dumps(_config_tree(cfg), sort_keys=True, default=str).encode()).hexdigest()


_DIGESTS: dict[tuple, str] = {}  # a file's sha256 by its identity and state: each file's bytes are hashed once


def _identity(path: str | os.PathLike) -> tuple:
    st = os.stat(path)
    return os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of the file's bytes, read once per process while the file is unchanged (the gate asks for the
    same inputs at every stage; :func:`snapshot_inputs` hashes them as it copies them)."""
    key = _identity(path)
    if (digest := _DIGESTS.get(key)) is None:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        digest = _DIGESTS[key] = h.hexdigest()
    return digest


def model_fingerprint(model_id: str) -> str:
    """The model's files as (name, size, modification time), hashed: a model replaced under the same path differs
    (its content is not read: GGUF and safetensors files run to gigabytes). A hub id or ``tiny://`` is its name."""
    from pema.owner.plm import resolve_model

    ref = resolve_model(model_id)
    root = Path(ref.path)
    files = [root / ref.gguf_file] if ref.gguf_file else sorted(p for p in root.rglob("*") if p.is_file()) \
        if root.is_dir() else []
    h = hashlib.sha256(model_id.encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def stage_inputs(cfg: PipelineConfig, output_dir: str | os.PathLike, stage: str) -> dict[str, str]:
    """What ``stage`` reads, each as a digest: ``data.<split>`` (sha256 of the file's bytes), ``model`` and the
    bundles under ``output_dir`` (sha256 of each bundle's index file, which lists its parts' checksums)."""
    splits, model, bundles = READS.get(stage, (ALL_SPLITS, True, ()))
    found = {f"data.{s}": file_sha256(p) for s in splits if (p := getattr(cfg.data, s)) is not None and
             os.path.isfile(p)}
    if model:
        found["model"] = model_fingerprint(cfg.model.model_id)
    layout = RunLayout(output_dir)
    for bundle in bundles:
        path = layout.root / bundle
        found[bundle] = file_sha256(path) if path.is_file() else "missing"
    return found


def _drop_downstream(entries: dict, stage: str) -> bool:
    """Replace the entries of the stages that read ``stage``'s outputs by a note saying why they must run again;
    True when one was there."""
    dropped = [later for later in DOWNSTREAM.get(stage, ()) if "result" in (entries.get(later) or {})]
    for later in dropped:
        entries[later] = {"redo": f"{stage}, whose outputs it reads, ran again"}
    return bool(dropped)


class Ledger:
    def __init__(self, output_dir: str | os.PathLike):
        self.layout = RunLayout(output_dir)
        self.path = Path(output_dir) / LEDGER

    def entries(self) -> dict[str, dict]:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def verdict(self, stage: str, cfg: PipelineConfig, inputs: dict[str, str] | None = None,
                **match) -> tuple[dict | None, str]:
        """``(entry, why)``: the entry of ``stage`` when it ran with this config, these ``inputs`` (when given),
        recorded these ``match`` values (what else the stage depends on, such as the registered name) and its
        outputs are in place; else None and why it has to run."""
        entry = self.entries().get(stage)
        if not isinstance(entry, dict) or "result" not in entry:
            return None, str(entry.get("redo")) if isinstance(entry, dict) and entry.get("redo") else NOT_DONE
        if entry.get("config") != config_digest(cfg):
            old, new = entry.get("config_tree") or {}, _config_tree(cfg)
            keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k)) if old else []
            changed = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:5]) or "the config"
            return None, f"the config changed ({changed})"
        if inputs is not None:
            if not isinstance(old := entry.get("inputs"), dict):
                return None, "its inputs were not recorded"
            if changed := [k for k in inputs if old.get(k) != inputs[k]]:
                return None, "; ".join(f"{k} changed (sha256 {str(old.get(k))[:12]} -> {inputs[k][:12]})"
                                       if k != "model" else "the model's files changed" for k in changed)
        for key, value in match.items():
            if entry.get(key) != value:
                return None, f"{key} changed ({entry.get(key)!r} -> {value!r})"
        if missing := self.layout.missing(OUTPUTS.get(stage, ())):
            return None, f"its outputs are gone ({', '.join(missing)})"
        return entry, ""

    def done(self, stage: str, cfg: PipelineConfig, inputs: dict[str, str] | None = None, **match) -> dict | None:
        return self.verdict(stage, cfg, inputs, **match)[0]

    def record(self, stage: str, cfg: PipelineConfig, result, run_id: str | None = None, **extra) -> None:
        entries = self.entries()
        _drop_downstream(entries, stage)
        entries[stage] = {"config": config_digest(cfg), "config_tree": _config_tree(cfg), "run_id": run_id,
                          "result": as_recorded(result), **extra}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(entries, indent=2, default=str))

    def forget_after(self, stage: str) -> None:
        """Drop the entries of the stages that read ``stage``'s outputs (it is about to run again)."""
        entries = self.entries()
        if _drop_downstream(entries, stage):
            write_text_atomic(self.path, json.dumps(entries, indent=2, default=str))

    def run_ids(self) -> list[str]:
        return [e["run_id"] for e in self.entries().values() if isinstance(e, dict) and e.get("run_id")]


def as_recorded(result):
    """A stage's result as the ledger keeps it: a typed result (such as training's ``TrainResult``) by its
    ``to_dict()``, anything else as it is."""
    return result.to_dict() if callable(getattr(result, "to_dict", None)) else result


def skip_line(stage: str, entry: dict) -> str:
    """The console line of a stage the gate skips: why, and where that is recorded (the ledger and the run)."""
    return (f"[{stage}] skipped: done earlier with the same config and inputs ({LEDGER}, run "
            f"{entry.get('run_id')})")


def gated(ledger: Ledger, stage: str, cfg: PipelineConfig, open_run: Callable[[str], AbstractContextManager],
          body: Callable, *, log=print, figure: Callable[[object], str] = lambda result: "",
          on_skip: Callable[[dict], None] = lambda entry: None, restore: Callable[[object], object] = lambda r: r,
          **match) -> tuple[object, dict | None]:
    """The stage gate every job goes through: ``body(logger)`` inside ``open_run(stage)`` (a metric logger's
    stage run), recorded in ``ledger`` (:func:`as_recorded`) with its inputs before the run ends; or, when the
    ledger holds ``stage`` as done with this config, these inputs and ``match``, the recorded result made typed
    again by ``restore`` (``on_skip(entry)`` first: the jobs end a run a kill left open). Either way one console
    line says what happened and why. Returns ``(result, entry)``: ``entry`` is the ledger's entry when the stage
    was skipped, else None."""
    inputs = stage_inputs(cfg, ledger.layout.root, stage)
    entry, why = ledger.verdict(stage, cfg, inputs, **match)
    if entry is not None:
        on_skip(entry)
        result = restore(entry["result"])
        entries = ledger.entries()
        for part in PARTS.get(stage, ()):  # each stage the skipped run holds: skipped with it
            if isinstance(held := entries.get(part), dict) and "result" in held:
                log(skip_line(part, held))
        shown = figure(result)
        log(skip_line(stage, entry) + (f": {shown}" if shown else ""))
        return result, entry
    log(f"[{stage}] {'started' if why == NOT_DONE else 'redone'}: {why}")
    ledger.forget_after(stage)
    start = time.perf_counter()
    with open_run(stage) as logger:
        result = body(logger)
        ledger.record(stage, cfg, result, logger.info().get("run_id"), inputs=inputs,
                      seconds=round(time.perf_counter() - start, 2), **match)
    return result, None


def snapshot_inputs(cfg: PipelineConfig, output_dir: str | os.PathLike, splits=ALL_SPLITS) -> PipelineConfig:
    """Read each configured JSONL split of ``splits`` (``ood_test`` with ``test``) once, at the job's edge: its
    bytes are copied to ``<output_dir>/inputs/<split>-<sha256[:16]>.jsonl`` as they are hashed
    (``inputs/sources.json`` says where from: :func:`~pema.formats.layout.source_of`), and the config returned
    reads the copies. Every stage, the MLflow datasets and the ledger then see the same bytes, even when a file is replaced
    while the job runs. Copies that the config no longer names are removed (the job holds the folder's lock)."""
    from pema.config import with_overrides

    folder = RunLayout(output_dir).root / SNAPSHOTS
    folder.mkdir(parents=True, exist_ok=True)
    paths, sources = {}, {}
    splits = (*splits, "ood_test") if "test" in splits else splits
    for split in dict.fromkeys(splits):
        if (src := getattr(cfg.data, split)) is None:
            continue
        tmp, h = folder / f".{split}.{os.getpid()}.tmp", hashlib.sha256()
        try:
            with open(src, "rb") as fh, open(tmp, "wb") as out:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
        except OSError as exc:  # a full disk: named with the copy it was writing, and no half copy left
            tmp.unlink(missing_ok=True)
            if exc.filename is None:
                raise OSError(exc.errno, exc.strerror, str(tmp)) from exc
            raise
        dest = folder / f"{split}-{h.hexdigest()[:16]}.jsonl"
        os.replace(tmp, dest)
        _DIGESTS[_identity(dest)] = h.hexdigest()  # the gate's digests of this copy: not read again
        paths[f"data.{split}"], sources[dest.name] = str(dest), str(src)
    write_text_atomic(folder / SOURCES, json.dumps(sources, indent=2))
    for stale in folder.iterdir():
        if stale.name not in sources and stale.name != SOURCES:
            stale.unlink(missing_ok=True)
    return with_overrides(cfg, paths)
