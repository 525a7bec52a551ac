"""Seeded hostile-input fuzzer for the jobs' inputs (issue 14, item 3): JSONL files, configs and command lines.

    python faults/fuzz_inputs.py --seed 0 --count 500 --report outputs/faults/fuzz_inputs.json

Every case (:mod:`faults.fuzz_cases`) runs one job's ``main(argv)`` in this process, in a folder of its own:
``cwd/`` (the working directory), ``inputs/`` (the files it reads) and ``out/`` (its ``--output-dir``: absent, or
holding a file of the user's and, for the jobs that read them, fake bundles). Ray and real work are guarded:
``init_ray`` and ``ray.init`` raise :class:`Accepted`, so a case that gets past the job's checks is reported as
"accepted" instead of starting anything. A case passes when

- the job exits 2 with ``error: ...`` on stderr and no traceback (no exception escaped ``main``; argparse's own
  ``usage`` errors count when they name the option),
- the error matches every pattern of the case (the file and line, the full dotted key, the option),
- the case's folder is as it was (nothing new, removed or changed under ``out/``, ``cwd/`` or ``inputs/``; nothing
  new in the work folder, and no run file such as ``mlruns`` or ``mlflow.db`` in the repository), and the
  process's peak memory did not grow by more than ``--max-rss-growth-mb``;
- or, for the few valid inputs among them (a UTF-8 BOM, which is accepted as standard; a text over the cap with
  ``data.overlength=truncate``), the job gets past its checks, having written nothing but what a job that starts
  writes first: its lock (``.pema.lock``) and its read-once copies of the inputs (``inputs/``).

Some cases need more than files (``Case.setup``, :mod:`faults.fuzz_setup`): another process holding the output
folder's lock, or a folder that cannot be written (for root, by the immutable attribute). ``--kinds`` runs a sample
of chosen kinds only, e.g. ``--kinds overlength_text,invisible_only_field,output_dir_read_only,folder_held``.

Exit code 0 when every case passes, 1 otherwise; the JSON report lists each failure with its reasons.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from faults.fuzz_cases import DIR, JOBS, KINDS, LOOP, Case, base_config, dump, generate, valid_jsonl  # noqa: E402
from faults.fuzz_setup import Unavailable, arranged  # noqa: E402

# what a job writes, watched for in the repository too (a path anchored there instead of in --output-dir); other
# new names there are not counted: the tree may be shared with other work
RUN_FILES = {"mlruns", "mlflow.db", "mlartifacts", "config.json", "summary.json", "scores.json", "memory", "head",
             "adapter", "predictions", "ray_train", "ray_tune", "trials", "compare", "train_history.json",
             "tune_state.json", "tune_summary.json", "train_checkpoints", "run"}


class Accepted(BaseException):
    """Raised by the guarded ``init_ray``: the job got past its input checks and would start Ray."""


class CaseTimeout(BaseException):
    """A case ran past ``--case-timeout`` (a hang: an alias bomb being expanded, a file read without bound)."""


def load_jobs() -> dict[str, Callable[[list[str]], int]]:
    """``{job: main}`` for the scripts in ``jobs/``, imported by path."""
    jobs = {}
    for name in JOBS:
        spec = importlib.util.spec_from_file_location(f"pema_fuzz_{name}_job", ROOT / "jobs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        jobs[name] = module.main
    return jobs


@contextmanager
def guarded():
    """``init_ray`` and ``ray.init`` raise :class:`Accepted`; no tracking server or Ray address from the
    environment (a case must be refused for its own input, not for a server that is down)."""
    import ray

    import pema.executors.ray_runtime as runtime
    import pema.executors.search_space  # noqa: F401  what the jobs import on their first call, imported before
    import pema.jobs.stages  # noqa: F401  the first case so that its memory is not counted against the case
    import pema.owner.plm  # noqa: F401

    def refuse(*args, **kwargs):
        raise Accepted()

    saved = runtime.init_ray, ray.init
    env = {k: os.environ.pop(k) for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS") if k in os.environ}
    runtime.init_ray = ray.init = refuse
    try:
        yield
    finally:
        runtime.init_ray, ray.init = saved
        os.environ.update(env)


@contextmanager
def watchdog(seconds: float):
    if seconds <= 0:
        yield
        return

    def fire(signum, frame):
        raise CaseTimeout()

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


CACHES = (".verified.json",)  # the memory's cache of verified parts: refreshed by any reader, not an output


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder`` but the caches: folders by name, files by size, mtime and (up to 1 MiB)
    content."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.name in CACHES:
            continue
        st = path.lstat()
        if path.is_symlink():
            found[str(path.relative_to(folder))] = ("link", os.readlink(path))
        elif path.is_dir():
            found[str(path.relative_to(folder))] = ("dir",)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if st.st_size <= 1 << 20 else None
            found[str(path.relative_to(folder))] = ("file", st.st_size, st.st_mtime_ns, digest)
    return found


def changes(before: dict, after: dict) -> list[str]:
    return ([f"new {p}" for p in sorted(set(after) - set(before))] +
            [f"removed {p}" for p in sorted(set(before) - set(after))] +
            [f"changed {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]])


@functools.lru_cache(maxsize=1)
def real_bundles() -> Path:
    """memory/, head/ and adapter/ of one small valid run (tiny://llama, the base config, 8 shipped pairs), built
    once per process with the inline executor."""
    from pema.config import config_from_dict
    from pema.executors.inline import InlineExecutor
    from pema.stages.build import run_build
    from pema.stages.train import run_train

    tree = base_config()
    data = ROOT / "data" / "wmt22"
    tree["data"] = {**{s: str(data / f"{s}.jsonl") for s in ("train", "dev", "test")}, "train_limit": 8,
                    "dev_limit": 4}
    cfg = config_from_dict(tree)
    folder = Path(tempfile.mkdtemp(prefix="pema-fuzz-bundles-"))
    run_build(cfg, folder, InlineExecutor(), progress=False)
    run_train(cfg, folder, InlineExecutor(), progress=False)
    return folder


def prepare(case: Case, arena: Path) -> dict[str, str]:
    """The case's folder: valid base inputs, the case's own files, the output folder's state; the placeholders."""
    inputs, cwd, out = arena / "inputs", arena / "cwd", arena / "out"
    inputs.mkdir(parents=True)
    cwd.mkdir()
    rng = random.Random(case.id)
    for split in ("train", "dev", "test"):
        (inputs / f"{split}.jsonl").write_bytes(valid_jsonl(rng))
    here = str(inputs).encode()
    (inputs / "base.yaml").write_bytes(dump(base_config()).replace(b"@IN@", here))
    (inputs / "notes.txt").write_text("the user's own notes\n")
    for rel, content in case.files.items():
        path = inputs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is DIR:
            path.mkdir(exist_ok=True)
        elif content is LOOP:
            path.symlink_to(path.name)
        else:
            path.write_bytes((content() if callable(content) else content).replace(b"@IN@", here))
    if case.out_state in ("user", "bundles"):
        out.mkdir()
        (out / "notes.txt").write_text("the user's own file\n")
    if case.out_state == "bundles":  # real bundles: the jobs verify them (checksums, shapes) before they start
        for name in ("memory", "head", "adapter"):
            shutil.copytree(real_bundles() / name, out / name)
    return {"@IN@": str(inputs), "@OUT@": str(out)}


def fill(text: str, subs: dict[str, str]) -> str:
    for key, value in subs.items():
        text = text.replace(key, value)
    return text


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_case(case: Case, jobs: dict, work: Path, *, timeout: float = 0, max_rss_growth_mb: float = 512,
             keep: bool = False) -> dict:
    """Run one case; returns its result: exit code, how it was refused, the error line, leftovers, reasons. The
    case's ``setup`` (:mod:`faults.fuzz_setup`: a process holding the folder, a read-only folder) is arranged around
    the run; one that cannot be made real here is reported as skipped, with the reason."""
    arena = work / f"case{case.id:05d}"
    subs = prepare(case, arena)
    try:
        with arranged(case.setup, subs) as (more, note):
            result = _run_prepared(case, jobs, work, arena, {**subs, **more}, timeout, max_rss_growth_mb)
            result["setup_note"] = note
    except Unavailable as exc:
        result = {**case.describe(), "argv": case.args, "exit_code": None, "how": "skipped", "error": "",
                  "leftovers": [], "seconds": 0.0, "rss_growth_mb": 0.0, "reasons": [], "passed": False,
                  "skipped": str(exc)}
    if not keep:
        shutil.rmtree(arena, ignore_errors=True)
    return result


# what a job that got past its checks has written by then: its folder, its lock and its read-once copies of the
# JSONL inputs
JOB_START = re.compile(r"^new out(/\.pema\.lock|/inputs(/[^/]+)?)?$")


def _run_prepared(case: Case, jobs: dict, work: Path, arena: Path, subs: dict[str, str], timeout: float,
                  max_rss_growth_mb: float) -> dict:
    argv = [fill(a, subs) for a in case.args]
    patterns = [fill(p, {k: re.escape(v) for k, v in subs.items()}) for p in case.names]
    before, around = snapshot(arena), (set(os.listdir(ROOT)), set(os.listdir(work)))
    stdout, stderr = io.StringIO(), io.StringIO()
    code, accepted, crash = None, False, None
    rss0, t0, prev = peak_rss_mb(), time.perf_counter(), os.getcwd()
    os.chdir(arena / "cwd")
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                with watchdog(timeout):
                    code = jobs[case.job](argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Accepted:
                accepted = True
            except CaseTimeout:
                crash, code = f"no answer within {timeout:g} s (a hang)", 1
            except Exception:  # what a real process would end with: a traceback and exit code 1
                crash, code = traceback.format_exc(), 1
    finally:
        os.chdir(prev)
    seconds = time.perf_counter() - t0
    err = stderr.getvalue()
    leftovers = changes(before, snapshot(arena))
    if accepted and case.expect == "accept":  # a valid input: the job took the folder and read its inputs
        leftovers = [p for p in leftovers if not JOB_START.match(p)]
    leftovers += [f"new {p} in the repository" for p in sorted(set(os.listdir(ROOT)) - around[0]) if p in RUN_FILES]
    leftovers += [f"new {p} in the work folder" for p in sorted(set(os.listdir(work)) - around[1])]
    error = err[err.find("error:"):].strip() if "error:" in err else ""
    how = "accepted" if accepted else "crash" if crash else "usage" if re.search(r"^usage:", err, re.M) else \
        "named" if code == 2 and re.search(r"^error: ", err, re.M) else f"exit {code}"
    reasons = []
    if case.expect == "accept":
        if not accepted:
            reasons.append(f"refused a valid input ({how}): {error[:300]}")
    else:
        if accepted:
            reasons.append("accepted: the job got past its checks (it would have started Ray)")
        elif not crash:
            if code != 2:
                reasons.append(f"exit code {code}, not 2")
            if not error:
                reasons.append("no 'error:' on stderr")
            reasons += [f"the error does not match {p!r}" for p in patterns if not re.search(p, error)]
    if crash:
        reasons.append("crashed: " + crash.strip().splitlines()[-1][:300])
    if "Traceback" in err:
        reasons.append("a traceback on stderr")
    if leftovers:
        reasons.append(f"left behind: {leftovers[:6]}")
    growth = max(0.0, peak_rss_mb() - rss0)
    if growth > max_rss_growth_mb:
        reasons.append(f"peak memory grew by {growth:.0f} MiB (over {max_rss_growth_mb:g})")
    return {**case.describe(), "argv": argv, "exit_code": code, "how": how, "error": error[:500],
            "leftovers": leftovers, "seconds": round(seconds, 3), "rss_growth_mb": round(growth, 1),
            "reasons": reasons, "passed": not reasons, **({"traceback": crash[-3000:]} if crash else {})}


def run_cases(cases: list[Case], jobs: dict | None = None, work: Path | None = None, *, timeout: float = 0,
              max_rss_growth_mb: float = 512, keep: bool = False, log: Callable[[str], None] | None = None) -> list:
    """Run ``cases`` under :func:`guarded` in ``work`` (a new temporary folder by default, removed at the end)."""
    jobs = jobs or load_jobs()
    if any(c.out_state == "bundles" for c in cases):
        real_bundles()  # built before the first case, so that its memory is not counted against one
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="pema-fuzz-")) if own else Path(work)
    results = []
    try:
        with guarded():
            for case in cases:
                result = run_case(case, jobs, work, timeout=timeout, max_rss_growth_mb=max_rss_growth_mb, keep=keep)
                results.append(result)
                if log and result["reasons"]:
                    log(f"FAIL #{case.id} {case.family}/{case.kind} {case.job}: {'; '.join(result['reasons'])}")
    finally:
        if own and not keep:
            shutil.rmtree(work, ignore_errors=True)
    return results


def summarize(results: list[dict], **meta) -> dict:
    def tally(key):
        table = defaultdict(Counter)
        for r in results:
            row = table[r[key]]
            row["cases"] += 1
            row["passed"] += r["passed"]
            row[r["how"]] += 1
        return {k: dict(v) for k, v in sorted(table.items())}

    failures = [r for r in results if r["reasons"]]
    skipped = [r for r in results if r["how"] == "skipped"]
    return {**meta, "cases": len(results), "passed": len(results) - len(failures) - len(skipped),
            "failed": len(failures), "skipped": len(skipped),
            "skip_reasons": sorted({r["skipped"] for r in skipped}),
            "named_errors": sum(r["how"] == "named" for r in results),
            "usage_errors": sum(r["how"] == "usage" for r in results),
            "accepted_as_expected": sum(r["how"] == "accepted" and r["expect"] == "accept" for r in results),
            "exit_codes": dict(Counter(str(r["exit_code"]) for r in results)),
            "cases_with_leftovers": sum(bool(r["leftovers"]) for r in results),
            "slowest_s": max((r["seconds"] for r in results), default=0),
            "families": tally("family"), "kinds": tally("kind"), "jobs": tally("job"),
            "failures": failures, "results": [{k: r.get(k) for k in ("id", "family", "kind", "job", "detail",
                                                                    "exit_code", "how", "error", "seconds")}
                                              | ({"setup": r["setup_note"]} if r.get("setup_note") else {})
                                              for r in results]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=len(KINDS), help=f"cases to run (default {len(KINDS)}: "
                        "every kind once)")
    parser.add_argument("--report", help="write the JSON report here")
    parser.add_argument("--families", help="comma separated: jsonl,config,cli (default: all)")
    parser.add_argument("--jobs", help=f"comma separated among {','.join(JOBS)} (default: all)")
    parser.add_argument("--kinds", help="comma separated kind names, e.g. overlength_text,folder_held (default: all)")
    parser.add_argument("--no-heavy", action="store_true", help="leave out the 10 MiB line and the 10^6-line files")
    parser.add_argument("--case-timeout", type=float, default=300, help="seconds before a case counts as a hang "
                        "(0: no limit)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=512)
    parser.add_argument("--keep", action="store_true", help="keep every case's folder (printed)")
    args = parser.parse_args(argv)
    families = tuple(args.families.split(",")) if args.families else None
    jobs = tuple(args.jobs.split(",")) if args.jobs else JOBS
    t0 = time.perf_counter()
    kinds = tuple(args.kinds.split(",")) if args.kinds else None
    try:
        cases = generate(args.seed, args.count, heavy=not args.no_heavy, families=families, jobs=jobs, kinds=kinds)
    except ValueError as exc:
        parser.error(f"--kinds: {exc}")
    work = Path(tempfile.mkdtemp(prefix="pema-fuzz-")) if args.keep else None
    results = run_cases(cases, load_jobs(), work, timeout=args.case_timeout, max_rss_growth_mb=args.max_rss_growth_mb,
                        keep=args.keep, log=lambda line: print(line, flush=True))
    report = summarize(results, seed=args.seed, count=args.count, wall_s=round(time.perf_counter() - t0, 1))
    for fam, row in report["families"].items():
        print(f"{fam:<7} {row['cases']:>4} cases  {row['passed']:>4} passed  named {row.get('named', 0):>4}  "
              f"usage {row.get('usage', 0):>3}  accepted {row.get('accepted', 0):>3}")
    kept = f"; kept in {work}" if work else ""
    for reason in report["skip_reasons"]:
        print(f"skipped: {reason}")
    print(f"{report['cases']} cases, {report['passed']} passed, {report['failed']} failed, "
          f"{report['skipped']} skipped, "
          f"{report['cases_with_leftovers']} with leftovers, {report['wall_s']} s{kept}")
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2, ensure_ascii=False))
        print(f"report: {args.report}")
    return 0 if not report["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
