"""Which stages of a run's folder are done: ``<output_dir>/stages.json``.

A stage that completes records, inside its run and before the run ends: the digest of the config it ran with
(every section but ``resources``, which changes where a stage runs, not what it makes), its result and its MLflow
run id. The same command run again skips a stage whose entry matches its config and whose outputs are in place,
and hands back the recorded result. So a job killed after a stage's work was done, at whatever instant, does not
run that stage a second time, and each stage keeps one finished run: the jobs layer ends a recorded run that the
kill left open as FINISHED (``pema.tracking.orphans.finish_recorded_runs``).

A stage that runs again (a changed config, a deleted output) drops the entries of the stages after it, which read
its outputs. A missing or unreadable ledger means nothing is done: stages rerun and resume from their own state
(memory parts, training checkpoints).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pema.config import PipelineConfig, to_dict
from pema.formats.layout import ADAPTER_BUNDLES, OWNER_BUNDLES, RunLayout, write_text_atomic
from pema.stages.decode import SYSTEMS

LEDGER = "stages.json"
PREDICTIONS = tuple(f"predictions/{system}.jsonl" for system in SYSTEMS)
OUTPUTS = {"build_memory": OWNER_BUNDLES, "train": ADAPTER_BUNDLES, "evaluate": PREDICTIONS,
           "pipeline": OWNER_BUNDLES + ADAPTER_BUNDLES + PREDICTIONS + ("summary.json",), "register": ADAPTER_BUNDLES,
           "compare": OWNER_BUNDLES + ("summary.json",)}
DOWNSTREAM = {"build_memory": ("train", "evaluate", "register", "pipeline", "compare"), "train": ("evaluate",
              "register", "pipeline"), "evaluate": ("pipeline",), "register": (), "pipeline": (), "compare": ()}


def config_digest(cfg: PipelineConfig) -> str:
    tree = {k: v for k, v in to_dict(cfg).items() if k != "resources"}
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()


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

    def done(self, stage: str, cfg: PipelineConfig, **match) -> dict | None:
        """The entry of ``stage`` when it ran with this config, recorded these ``match`` values (what else the
        stage depends on, such as the registered name) and its outputs are in place, else None."""
        entry = self.entries().get(stage)
        if not isinstance(entry, dict) or entry.get("config") != config_digest(cfg) or "result" not in entry:
            return None
        if any(entry.get(key) != value for key, value in match.items()):
            return None
        return None if self.layout.missing(OUTPUTS.get(stage, ())) else entry

    def record(self, stage: str, cfg: PipelineConfig, result, run_id: str | None = None, **extra) -> None:
        entries = self.entries()
        for later in DOWNSTREAM.get(stage, ()):
            entries.pop(later, None)
        entries[stage] = {"config": config_digest(cfg), "run_id": run_id, "result": result, **extra}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(entries, indent=2, default=str))

    def forget_after(self, stage: str) -> None:
        """Drop the entries of the stages that read ``stage``'s outputs (it is about to run again)."""
        entries = self.entries()
        if any(later in entries for later in DOWNSTREAM.get(stage, ())):
            for later in DOWNSTREAM.get(stage, ()):
                entries.pop(later, None)
            write_text_atomic(self.path, json.dumps(entries, indent=2, default=str))

    def run_ids(self) -> list[str]:
        return [e["run_id"] for e in self.entries().values() if isinstance(e, dict) and e.get("run_id")]
