"""SIGKILL each job at seeded instants over its run, rerun the same command, and check that nothing was lost.

    python faults/kill_sweep.py --kills 20 --seed 0 --report outputs/faults/kill_report.json   (make faults)
    python faults/kill_sweep.py --jobs build,train --kills 3                                   (a sample)

For each job (build, train, evaluate, pipeline, register, tune, compare, owner) on the smoke config: one
uninterrupted run gives the reference and the job's duration T. Then, for each of ``--kills`` instants t_i drawn
from the seed, one in each of ``--kills`` equal slices of [0, T) (the first second to the last), a fresh copy of
the job's inputs, the job started in its own process group, ``SIGKILL`` to the whole group at t_i, and the same
command run again. An instant passes when the rerun exits 0 and:

- the outputs equal the reference: memory rows exact with no (example, position) twice, the head and adapter
  tensors identical, predictions identical, the summary's scores identical, the champion's dev BLEU identical,
  the owner service's head fingerprint and keys identical;
- MLflow is consistent: the store opens (not half-migrated), no run is left RUNNING, every stage has a FINISHED
  run, and the killed job's runs are KILLED or FAILED.

``--signal INT`` (Ctrl+C) or ``--signal TERM`` sends that signal instead. The instant then also needs the job to
have exited within 60 s with 130 or 143 (or 0 when it had finished before the signal), with a line saying to rerun
the same command, no traceback, no MLflow run RUNNING and none of its processes left 30 s later.

``--check data_changed`` and ``--check two_jobs`` run the checks of :mod:`faults.user_sweep` instead: a JSONL file
changed under the same path between two runs, and two copies of a job started together on one folder.

    python faults/kill_sweep.py --signal INT --jobs build,train,pipeline --kills 3
    python faults/kill_sweep.py --check data_changed --jobs build,evaluate,pipeline --trials 2

The jobs run against one Ray cluster started here (as ``ray job submit`` jobs would); a killed driver's actors and
workers are Ray's to clean up. Every process a job starts carries ``PEMA_FAULT_TAG``; any that outlives the kill
is killed too, and counted.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from faults.compare_outputs import compare, mlflow_problems  # noqa: E402
from faults.sweep_common import (JOBS, PY, SMOKE, TOKENS, Job, fresh, job_env, kill_tagged,  # noqa: E402,F401
                                 run, running_runs, strays, tagged_processes, tally)

SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}
STOP_WITHIN_S = 60  # a job sent SIGINT or SIGTERM must have exited by then (it is then SIGKILLed and counted)
STRAYS_WAIT_S = 30  # how long a stopped job's processes may take to go (Ray's, a few seconds)
RERUN_LINE = "rerun the same command"


def kill_at(cmd: list[str], env: dict, at: float, log: Path, sig: str = "KILL") -> dict:
    """Start ``cmd`` in its own process group and send ``sig`` to the group ``at`` seconds later (if it still runs),
    as a terminal's Ctrl+C (INT) or a scheduler's stop (TERM) does. For INT and TERM the job must then exit within
    :data:`STOP_WITHIN_S` with 128 + the signal's number, say to rerun the same command, print no traceback, leave
    no MLflow run RUNNING and no process behind; what it did not do is in ``problems``."""
    attempt = log.with_name(f"{log.stem}.attempt.log")
    with open(attempt, "wb") as f:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(at)
            result = {"killed": False, "rc": proc.returncode, "ended_s": time.monotonic() - start}
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, SIGNALS[sig])
            sent = time.monotonic()
            try:
                proc.wait(STOP_WITHIN_S if sig != "KILL" else None)
                result = {"killed": True, "rc": proc.returncode, "stop_s": round(time.monotonic() - sent, 2)}
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                result = {"killed": True, "rc": None, "stop_s": None}
    text = attempt.read_text(errors="replace")
    with open(log, "a") as f:
        f.write(text)
    attempt.unlink()
    if sig == "KILL":
        time.sleep(0.2)
        return {**result, "stray_processes_killed": kill_tagged(env["PEMA_FAULT_TAG"]) if result["killed"] else 0}
    stages = re.findall(r"^\[(\w+)\] (?:started|redone)", text, re.M)
    result["during"] = stages[-1] if stages else "before the first stage"  # where the signal landed
    problems = []
    if not result["killed"]:
        if result["rc"] != 0:
            problems.append(f"it ended before the signal with exit {result['rc']}")
    elif result["rc"] is None:
        problems.append(f"still running {STOP_WITHIN_S} s after SIG{sig} (then SIGKILLed)")
    else:
        if result["rc"] != 128 + SIGNALS[sig]:
            problems.append(f"exit {result['rc']} after SIG{sig}, not {128 + SIGNALS[sig]}")
        if RERUN_LINE not in text:
            problems.append(f"no '{RERUN_LINE}' line")
    if "Traceback" in text:
        problems.append("a traceback: " + text[text.rfind("Traceback"):][-300:].strip().splitlines()[-1])
    if left := running_runs(Path(cmd[cmd.index("--output-dir") + 1])):
        problems.append(f"{len(left)} MLflow run(s) left RUNNING after SIG{sig}")
    n = strays(env["PEMA_FAULT_TAG"], STRAYS_WAIT_S)  # this module's wait (the tests lower it)
    if n:
        problems.append(f"{n} process(es) left behind after SIG{sig}")
    return {**result, "stray_processes_killed": n, "problems": problems}


def shutdown_serve(cluster) -> None:
    subprocess.run([str(Path(PY).with_name("serve")), "shutdown", "-y", "-a", cluster.dashboard], cwd=ROOT,
                   capture_output=True, timeout=120)


def prepare_bases(root: Path, cluster, log: Path) -> dict[str, Path]:
    env = job_env(cluster, uuid.uuid4().hex)
    bases = {"built": fresh(None, root / "base" / "built")}
    for job, base in (("build", "built"),):
        rc, _ = run(JOBS[job].command(bases[base]), env, 900, log)
        assert rc == 0, f"the {job} job that prepares the base failed: see {log}"
    bases["trained"] = fresh(bases["built"], root / "base" / "trained")
    rc, _ = run(JOBS["train"].command(bases["trained"]), env, 900, log)
    assert rc == 0, f"the train job that prepares the base failed: see {log}"
    for base in bases.values():  # the bases' own MLflow runs are not the swept job's
        for name in ("mlflow.db", "mlartifacts"):
            p = base / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return bases


def fractions(kills: int, seed: int) -> list[float]:
    """One seeded point in each of ``kills`` equal slices of [0, 1): where in the job's run each kill lands."""
    rng = random.Random(seed)
    return [(i + rng.random()) / kills for i in range(kills)]


def instants(duration: float, kills: int, seed: int) -> list[float]:
    return [round(duration * f, 2) for f in fractions(kills, seed)]


def sweep_job(job: Job, bases: dict, root: Path, cluster, kills: int, seed: int, log_dir: Path,
              only: set[int] | None = None, sig: str = "KILL") -> dict:
    from local_ray import free_port

    base = bases.get(job.needs) if job.needs else None
    log = log_dir / f"{job.name}.log"
    port = free_port()
    if job.name == "owner":
        shutdown_serve(cluster)
    ref = fresh(base, root / job.name / "reference")
    rc, duration = run(job.command(ref, port), job_env(cluster, uuid.uuid4().hex), job.timeout_s, log)
    if rc != 0:
        return {"job": job.name, "error": f"the uninterrupted run exited {rc}: see {log}"}
    result = {"job": job.name, "signal": sig, "duration_s": round(duration, 1), "tried": 0, "killed": 0,
              "survived": 0, "stray_processes": 0, "finished_twice": 0, "exit_codes": {}, "stop_s_max": 0.0,
              "failures": []}
    for i, frac in enumerate(fractions(kills, seed + sum(map(ord, job.name)))):
        # the run's length: the reference's, or shorter once a job has been seen to end sooner (a loaded machine
        # makes the reference slow), so that the instants stay inside the run
        at = round(frac * duration, 2)
        if only is not None and i not in only:  # a rerun of chosen instants of an earlier sweep
            continue
        if job.name == "owner":
            shutdown_serve(cluster)
        out = fresh(base, root / job.name / f"kill{i:02d}")
        env = job_env(cluster, uuid.uuid4().hex)
        with open(log, "a") as f:
            f.write(f"\n==== {job.name} SIG{sig} {i} at {at} s ====\n")
        killed = kill_at(job.command(out, port), env, at, log, sig)
        if not killed["killed"] and killed["rc"] == 0:
            duration = min(duration, killed["ended_s"])
        if sig != "KILL":
            code = str(killed["rc"])
            result["exit_codes"][code] = result["exit_codes"].get(code, 0) + 1
            result["stop_s_max"] = max(result["stop_s_max"], killed.get("stop_s") or 0.0)
            result.setdefault("during", []).append(killed["during"] if killed["killed"] else "after the end")
        with open(log, "a") as f:
            f.write(f"\n==== {job.name} rerun after SIG{sig} {i} ====\n")
        rc, _ = run(job.command(out, port), env, job.timeout_s, log)
        problems = [f"SIG{sig}: {p}" for p in killed.get("problems", [])]
        problems += [f"the rerun exited {rc}"] if rc != 0 else []
        if rc == 0:
            problems += compare(job.outputs, ref, out, port=port, tokens=TOKENS)
            mlflow_report = mlflow_problems(out, killed["killed"], owner=job.name == "owner")
            problems += mlflow_report["problems"]
            result["finished_twice"] += mlflow_report["finished_twice"]
        result["killed"] += killed["killed"]
        result["stray_processes"] += killed.get("stray_processes_killed", 0)
        tally(result, "survived", problems, {"instant_s": at, "killed": killed["killed"]}, out,
              f"{job.name}: SIG{sig} {i + 1}/{kills} at {at:.2f} s ({frac:.0%} of {duration:.1f} s)")
    if job.name == "owner":
        shutdown_serve(cluster)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"comma separated, of {','.join(JOBS)}")
    parser.add_argument("--kills", type=int, default=20, help="kill instants per job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="comma separated instant numbers (0-based) to run again, e.g. 2,13")
    parser.add_argument("--signal", choices=tuple(SIGNALS), default="KILL", help="what is sent to the job's process "
                        "group at each instant (default KILL; INT is Ctrl+C, TERM a scheduler's stop)")
    parser.add_argument("--check", choices=("kill", "data_changed", "two_jobs"), default="kill",
                        help="kill (default): the signal sweep; data_changed: a JSONL file changed under the same "
                        "path between two runs; two_jobs: two copies of the job on one folder (faults/user_sweep.py)")
    parser.add_argument("--trials", type=int, default=2, help="trials per job of --check data_changed / two_jobs")
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "faults" / "kills"))
    parser.add_argument("--report", default=str(ROOT / "outputs" / "faults" / "kill_report.json"))
    args = parser.parse_args(argv)
    names = [n for n in args.jobs.split(",") if n]
    if unknown := [n for n in names if n not in JOBS]:
        print(f"error: --jobs: unknown {unknown}; choose from {list(JOBS)}", file=sys.stderr)
        return 2
    from local_ray import start_cluster

    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cluster = start_cluster(root, num_cpus=4)
    start = time.monotonic()
    report = {"seed": args.seed, "check": args.check, "jobs": [],
              **({"signal": args.signal, "kills_per_job": args.kills} if args.check == "kill" else
                 {"trials_per_job": args.trials})}
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    try:
        needed = {JOBS[n].needs for n in names} - {None}
        bases = prepare_bases(root, cluster, root / "bases.log") if needed else {}
        for n in names:  # the report is rewritten after every job: a long sweep cut short keeps what it found
            only = {int(i) for i in args.only.split(",")} if args.only else None
            if args.check == "kill":
                report["jobs"].append(sweep_job(JOBS[n], bases, root, cluster, args.kills, args.seed, root, only,
                                                args.signal))
            else:
                from faults.user_sweep import CHECKS

                report["jobs"].append(CHECKS[args.check](JOBS[n], bases, root, cluster, args.trials, args.seed, root))
            report["wall_s"] = round(time.monotonic() - start)
            Path(args.report).write_text(json.dumps(report, indent=2))
    finally:
        cluster.stop()
    results = report["jobs"]
    ok = "survived" if args.check == "kill" else "passed"
    for r in results:
        print(f"{r['job']}: {r.get(ok, 0)}/{r.get('tried', 0)} {ok}"
              + (f" ({r.get('killed', 0)} signalled mid-run, SIG{args.signal})" if args.check == "kill" else
                 f" ({args.check})") + (f"; {r['error']}" if "error" in r else ""))
    print(f"report: {args.report}; wall {report.get('wall_s', 0)} s")
    return 0 if all(r.get(ok) == r.get("tried") and "error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
