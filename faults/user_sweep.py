"""What users do to a job besides killing it (issue 21), as checks of the kill sweep (:mod:`faults.kill_sweep`,
``--check data_changed`` and ``--check two_jobs``), each over ``--trials`` seeded trials per job:

- ``data_changed`` (build, evaluate, pipeline): a complete run on copies of the JSONL files, then one of them is
  changed under the same path (a pair dropped, or two pairs swapped, among those the config reads) and the same
  command is run again. It passes when the rerun exits 0, its console says the stage that reads the file was
  redone because that file changed (and, for a pipeline whose test file changed, that the build and the training
  were skipped), its outputs equal those of a fresh run on the new file and differ from the old ones (else the
  change tested nothing), and no MLflow run is left RUNNING.
- ``two_jobs`` (any job): two copies of the same command started together on one fresh folder, the second after a
  seeded delay of 0-2 s. It passes when exactly one exits 2 naming the other's pid as the holder, with no
  traceback, and the other exits 0 with outputs equal to an uninterrupted reference, each stage with one FINISHED
  run, none RUNNING, and no process left behind.
"""
from __future__ import annotations

import random
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from faults.compare_outputs import compare, mlflow_problems
from faults.sweep_common import JOBS, ROOT, SMOKE, Job, fresh, job_env, run, running_runs, strays, tally

# the splits each job's change may touch, and the stage that reads that split first
CHANGED = {"build": {"train": "build_memory", "dev": "build_memory"},
           "evaluate": {"test": "evaluate"},
           "pipeline": {"train": "build_memory", "dev": "build_memory", "test": "evaluate"}}
SKIPPED = {("pipeline", "test"): ("build_memory", "train")}  # untouched by the change: must be skipped


def data_copies(folder: Path) -> list[str]:
    """Copies of the smoke config's JSONL splits in ``folder``; the overrides that point the job at them."""
    from pema.config import load_config

    cfg = load_config(SMOKE)
    folder.mkdir(parents=True, exist_ok=True)
    overrides = []
    for split in ("train", "dev", "test"):
        dest = folder / f"{split}.jsonl"
        shutil.copyfile(ROOT / getattr(cfg.data, split), dest)
        overrides.append(f"data.{split}={dest}")
    return overrides


def change_pairs(path: Path, limit: int | None, rng: random.Random) -> str:
    """Drop one pair, or swap two, among the first ``limit`` pairs of ``path``, in place; says what it did."""
    lines = path.read_bytes().splitlines(keepends=True)
    pairs = [i for i, line in enumerate(lines) if line.strip()][:limit]
    if rng.random() < 0.5:
        i = rng.choice(pairs)
        del lines[i]
        detail = f"dropped the pair on line {i + 1}"
    else:
        i, j = sorted(rng.sample(pairs, 2))
        lines[i], lines[j] = lines[j], lines[i]
        detail = f"swapped the pairs on lines {i + 1} and {j + 1}"
    path.write_bytes(b"".join(lines))
    return f"{path.name}: {detail}"


def _attempt(cmd: list[str], env: dict, timeout: float, log: Path, title: str) -> tuple[int, str]:
    attempt = log.with_name(f"{log.stem}.attempt.log")
    attempt.unlink(missing_ok=True)
    rc, _ = run(cmd, env, timeout, attempt)
    text = attempt.read_text(errors="replace")
    with open(log, "a") as f:
        f.write(f"\n==== {title} (exit {rc}) ====\n{text}")
    attempt.unlink()
    return rc, text


def data_changed_job(job: Job, bases: dict, root: Path, cluster, trials: int, seed: int, log_dir: Path) -> dict:
    from pema.config import load_config

    if job.name not in CHANGED:
        return {"job": job.name, "check": "data_changed", "error": f"no data_changed check for {job.name}; "
                f"choose from {sorted(CHANGED)}"}
    base = bases.get(job.needs) if job.needs else None
    log, rng = log_dir / f"{job.name}.data_changed.log", random.Random(seed + sum(map(ord, job.name)))
    limits = load_config(SMOKE).data
    result = {"job": job.name, "check": "data_changed", "tried": 0, "passed": 0, "trials": [], "failures": []}
    for i in range(trials):
        start = time.monotonic()
        trial = root / job.name / f"changed{i:02d}"
        shutil.rmtree(trial, ignore_errors=True)
        overrides = data_copies(trial / "data")
        cmd_job = Job(job.name, job.argv + overrides, job.needs, job.outputs, job.timeout_s)
        env = job_env(cluster, uuid.uuid4().hex)
        out = fresh(base, trial / "run")
        problems, what = [], "-"
        rc, _ = _attempt(cmd_job.command(out), env, job.timeout_s, log, f"{job.name} trial {i}: first run")
        if rc != 0:
            problems.append(f"the first run exited {rc}")
        else:
            shutil.copytree(out, trial / "before", symlinks=True)
            split = rng.choice(sorted(CHANGED[job.name]))
            what = change_pairs(trial / "data" / f"{split}.jsonl", getattr(limits, f"{split}_limit"), rng)
            rc, text = _attempt(cmd_job.command(out), env, job.timeout_s, log, f"{job.name} trial {i}: rerun, {what}")
            stage = CHANGED[job.name][split]
            lines = [line for line in text.splitlines() if re.match(r"^\[\w+\] (skipped|redone|started)", line)]
            if rc != 0:
                problems.append(f"the rerun after the change exited {rc}")
            if not re.search(rf"^\[{stage}\] redone: (.*; )?data\.{split} changed", text, re.M):
                problems.append(f"no '[{stage}] redone: data.{split} changed' line (stage lines: {lines})")
            for other in SKIPPED.get((job.name, split), ()):
                if not re.search(rf"^\[{other}\] skipped", text, re.M):
                    problems.append(f"[{other}] was not skipped, though the change does not touch it")
            if running := running_runs(out):
                problems.append(f"{len(running)} MLflow run(s) left RUNNING")
            fresh_out = fresh(base, trial / "fresh")
            rc_fresh, _ = _attempt(cmd_job.command(fresh_out), env, job.timeout_s, log,
                                   f"{job.name} trial {i}: a fresh run on the changed file")
            if rc_fresh != 0:
                problems.append(f"the fresh run on the changed file exited {rc_fresh}")
            elif rc == 0:
                problems += [f"against a fresh run on the new file: {p}" for p in
                             compare(job.outputs, fresh_out, out)]
                if not compare(job.outputs, fresh_out, trial / "before"):
                    problems.append("the change left the outputs as they were: it tested nothing")
            result["trials"].append({"trial": i, "change": what, "stage_lines": lines,
                                     "seconds": round(time.monotonic() - start, 1)})
        strays(env["PEMA_FAULT_TAG"], wait_s=5)
        tally(result, "passed", problems, {"trial": i}, trial, f"{job.name}: data_changed {i + 1}/{trials} ({what})")
    return result


def two_jobs_job(job: Job, bases: dict, root: Path, cluster, trials: int, seed: int, log_dir: Path, *,
                 reference: Path | None = None) -> dict:
    """``reference``: the folder of an uninterrupted run of the same command (default: one is run here)."""
    base = bases.get(job.needs) if job.needs else None
    log, rng = log_dir / f"{job.name}.two_jobs.log", random.Random(seed + sum(map(ord, job.name)))
    duration = None
    if reference is None:
        reference = fresh(base, root / job.name / "two_reference")
        rc, duration = run(job.command(reference), job_env(cluster, uuid.uuid4().hex), job.timeout_s, log)
        if rc != 0:
            return {"job": job.name, "check": "two_jobs", "error": f"the reference run exited {rc}: see {log}"}
    ref = reference
    result = {"job": job.name, "check": "two_jobs", "duration_s": duration and round(duration, 1), "tried": 0,
              "passed": 0, "refused_in_s_max": 0.0, "failures": []}
    for i in range(trials):
        delay = round(rng.uniform(0, 2), 2)
        out = fresh(base, root / job.name / f"two{i:02d}")
        env = job_env(cluster, uuid.uuid4().hex)
        logs = [log_dir / f"{job.name}.two{i}.{k}.log" for k in "ab"]
        procs, started = [], []
        for k, path in enumerate(logs):
            if k:
                time.sleep(delay)
            with open(path, "wb") as f:
                started.append(time.monotonic())
                procs.append(subprocess.Popen(job.command(out), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        ended = [None, None]  # when each copy exited, polled together: the refused one ends first
        deadline = time.monotonic() + job.timeout_s
        while None in ended:
            for k, p in enumerate(procs):
                if ended[k] is None and (p.poll() is not None or time.monotonic() > deadline):
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                    ended[k] = time.monotonic()
            time.sleep(0.1)
        rcs, texts = [p.returncode for p in procs], [path.read_text(errors="replace") for path in logs]
        with open(log, "a") as f:
            for k, (path, text) in enumerate(zip(logs, texts)):
                f.write(f"\n==== {job.name} two_jobs {i}, copy {'ab'[k]} (pid {procs[k].pid}, exit {rcs[k]}, "
                        f"started +{started[k] - started[0]:.2f} s) ====\n{text}")
                path.unlink()
        problems = [f"copy {'ab'[k]}: a traceback" for k, t in enumerate(texts) if "Traceback" in t]
        if sorted(rcs) != [0, 2]:
            problems.append(f"exit codes {rcs}, not one 0 and one 2")
        else:
            win, lose = (0, 1) if rcs[0] == 0 else (1, 0)
            if f"another job holds it, pid {procs[win].pid} " not in texts[lose]:
                problems.append(f"the refused copy does not name the holder, pid {procs[win].pid}: "
                                f"{texts[lose].strip().splitlines()[-1:]}")
            result["refused_in_s_max"] = max(result["refused_in_s_max"], round(ended[lose] - started[lose], 1))
            problems += compare(job.outputs, ref, out)
            report = mlflow_problems(out, killed=False)
            problems += report["problems"]
            if report["finished_twice"]:
                problems.append(f"{report['finished_twice']} stage(s) with two FINISHED runs")
        if n := strays(env["PEMA_FAULT_TAG"]):
            problems.append(f"{n} process(es) left behind")
        tally(result, "passed", problems, {"trial": i, "delay_s": delay, "exit_codes": rcs}, out,
              f"{job.name}: two_jobs {i + 1}/{trials} (second copy +{delay} s, exits {rcs})")
    return result


CHECKS = {"data_changed": data_changed_job, "two_jobs": two_jobs_job}
__all__ = ["CHECKS", "JOBS", "change_pairs"]
