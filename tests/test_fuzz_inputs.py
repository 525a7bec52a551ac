"""The hostile-input fuzzer (``faults/fuzz_inputs.py``, issue 14): a seeded sample over every kind of case and every
job gets a named error (exit code 2, ``error: ...`` naming the file and line or the full dotted key, no traceback)
and leaves every folder as it was; the harness itself reports an accepted input, a file left behind, a crash; and
the loaders' own guards (alias bombs, a BOM, a line over the limit) hold when called directly."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from faults.fuzz_cases import JOBS, KINDS, Case, bomb, job_args  # noqa: E402
from faults.fuzz_cases import generate  # noqa: E402
from faults.fuzz_inputs import load_jobs, run_cases, summarize  # noqa: E402

SEED = 14


@pytest.fixture(scope="module")
def jobs():
    return load_jobs()


@pytest.fixture(scope="module")
def sample(jobs, tmp_path_factory):
    # every kind once (the 10 MiB line and the 10^6-line file included), then a few more; the jobs in rotation
    cases = generate(SEED, len(KINDS) + 8)
    return cases, run_cases(cases, jobs, tmp_path_factory.mktemp("fuzz"))


def test_the_sample_covers_every_family_kind_and_job(sample):
    cases, _ = sample
    assert {c.kind for c in cases} == {k.name for k in KINDS}
    assert {c.family for c in cases} == {"jsonl", "config", "cli"}
    assert {c.job for c in cases} == set(JOBS)
    assert generate(SEED, len(cases))[5].describe() == cases[5].describe()  # the same seed, the same cases


def test_every_hostile_input_gets_a_named_error_and_leaves_the_folders_as_they_were(sample):
    _, results = sample
    failures = [f"#{r['id']} {r['family']}/{r['kind']} {r['job']} ({r['detail'][:120]}): {r['reasons']}"
                for r in results if r["reasons"]]
    assert not failures, "\n".join(failures)
    for r in results:
        assert not r["leftovers"], r
        if r["expect"] == "error":
            assert r["exit_code"] == 2 and r["how"] in ("named", "usage") and "error:" in r["error"], r
        else:  # a valid input among them (a UTF-8 BOM): it gets past the checks, and nothing was written either
            assert r["how"] == "accepted", r
    report = summarize(results, seed=SEED)
    assert report["failed"] == 0 and report["cases_with_leftovers"] == 0
    assert report["named_errors"] + report["usage_errors"] + report["accepted_as_expected"] == len(results)


ISSUE_21 = ("overlength_text", "invisible_only_field", "output_dir_read_only", "folder_held")  # + overlength_1mb


def test_the_issue_21_kinds_get_named_errors(jobs, tmp_path):
    """A text over data.max_tokens, a field of zero-width characters, a folder that cannot be written, a folder
    another process holds: each named, exit 2, nothing written (the 1 MB text is in the sample above)."""
    import os

    cases = generate(SEED, 12, kinds=ISSUE_21)
    assert {c.kind for c in cases} == set(ISSUE_21) and len({c.job for c in cases}) >= 5
    results = run_cases(cases, jobs, tmp_path)
    failures = [f"#{r['id']} {r['kind']} {r['job']} ({r['detail'][:120]}): {r['reasons']}" for r in results
                if r["reasons"]]
    assert not failures, "\n".join(failures)
    for r in results:
        if r.get("skipped"):  # root without the immutable attribute: no read-only folder to be had
            assert r["kind"] == "output_dir_read_only" and os.geteuid() == 0, r
            continue
        assert r["how"] in ("named", "accepted") and r["passed"], r
        if r["kind"] == "folder_held":
            assert "another job holds it, pid " in r["error"] and r["setup_note"].startswith("held by pid"), r


def test_the_setups_are_real(tmp_path):
    from faults.fuzz_setup import Unavailable, holder, read_only
    from pema.errors import ConfigError
    from pema.jobs.guard import FolderLock

    with holder(tmp_path / "held") as pid:
        with pytest.raises(ConfigError, match=rf"another job holds it, pid {pid} "):
            with FolderLock(tmp_path / "held"):
                pass
    with FolderLock(tmp_path / "held"):  # the holder is gone, and its lock with it
        pass
    try:
        with read_only(tmp_path / "ro"):
            with pytest.raises(OSError):
                (tmp_path / "ro" / "x").write_text("x")
    except Unavailable as exc:
        pytest.skip(str(exc))
    (tmp_path / "ro" / "x").write_text("x")  # writable again after the case


# ---------------------------------------------------------------------------- the harness can fail


@pytest.mark.parametrize("job", JOBS)
def test_the_harness_reports_a_valid_input_as_accepted(job, jobs, tmp_path):
    # the base inputs of every case are valid for every job: a refusal is the case's defect, not the setup's
    case = Case("cli", "guard", job, "nothing wrong", job_args(job), [], out_state="bundles")
    [result] = run_cases([case], jobs, tmp_path)
    assert result["how"] == "accepted" and not result["passed"], result
    assert any(reason.startswith("accepted") for reason in result["reasons"])
    [ok] = run_cases([Case("cli", "guard", job, "nothing wrong", job_args(job), [], out_state="bundles",
                           expect="accept")], jobs, tmp_path)
    assert ok["passed"], ok


def _leaves_a_store(argv):
    out = Path(argv[argv.index("--output-dir") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "mlflow.db").write_bytes(b"")
    print(f"error: {out} refused", file=sys.stderr)
    return 2


def _writes_mlruns_in_the_cwd(argv):
    Path("mlruns").mkdir()
    print("error: refused", file=sys.stderr)
    return 2


def _edits_the_users_file(argv):
    out = Path(argv[argv.index("--output-dir") + 1])
    (out / "notes.txt").write_text("overwritten\n")
    print("error: refused", file=sys.stderr)
    return 2


def _crashes(argv):
    raise TypeError("expected str, bytes or os.PathLike object, not NoneType")


def _names_nothing(argv):
    print("error: something is wrong", file=sys.stderr)
    return 2


def _exits_1(argv):
    print("error: refused", file=sys.stderr)
    return 1


def _prints_a_traceback(argv):
    print("Traceback (most recent call last):\n  ...\nerror: refused", file=sys.stderr)
    return 2


@pytest.mark.parametrize("fake, reason", [
    (_leaves_a_store, "new out/mlflow.db"), (_writes_mlruns_in_the_cwd, "new cwd/mlruns"),
    (_edits_the_users_file, "changed out/notes.txt"), (_crashes, "crashed: TypeError"),
    (_names_nothing, "does not match"), (_exits_1, "exit code 1"), (_prints_a_traceback, "a traceback on stderr")])
def test_the_harness_reports_what_a_bad_job_does(fake, reason, tmp_path):
    case = Case("jsonl", "guard", "pipeline", "a fake job", job_args("pipeline") + ["--train", "@IN@/bad.jsonl"],
                [r"@IN@/bad\.jsonl:3"], out_state="user")
    [result] = run_cases([case], {"pipeline": fake}, tmp_path)
    assert not result["passed"] and any(reason in r for r in result["reasons"]), result["reasons"]


def test_the_harness_passes_a_job_that_does_it_right(tmp_path):
    def refuses(argv):
        print(f"error: {argv[argv.index('--train') + 1]}:3: not valid JSON", file=sys.stderr)
        return 2

    case = Case("jsonl", "guard", "pipeline", "a fake job", job_args("pipeline") + ["--train", "@IN@/bad.jsonl"],
                [r"@IN@/bad\.jsonl:3(?!\d)"], out_state="bundles")
    [result] = run_cases([case], {"pipeline": refuses}, tmp_path)
    assert result["passed"] and result["how"] == "named", result


# ------------------------------------------------------------------------- the guards, called directly


def test_yaml_alias_bombs_and_recursive_aliases_are_refused_naming_the_file(tmp_path):
    from pema.config import load_config
    from pema.errors import ConfigError
    from pema.formats.yaml_safe import load_yaml

    path = tmp_path / "bomb.yaml"
    path.write_text(f"lora:\n  target_modules: {bomb()}\n")
    with pytest.raises(ConfigError, match=rf"{path}:2:\d+: the document expands to more than 100,000 values"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override 'lora\.target_modules=.*billion laughs"):
        load_config(None, [f"lora.target_modules={bomb(mapping=True)}"])
    with pytest.raises(ConfigError, match="recursive"):
        load_yaml("a: &r [*r]", "x.yaml")
    assert load_yaml("a: &x [1, 2]\nb: *x\nc: {<<: {d: 1}}", "x.yaml") == {"a": [1, 2], "b": [1, 2], "c": {"d": 1}}


def test_jsonl_bom_is_accepted_and_long_lines_and_bad_escapes_are_refused(tmp_path):
    from pema.errors import DataError
    from pema.formats.tasks import MAX_LINE_CHARS, check_pairs, load_pairs

    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"en": "a", "du": "b"}\n{"en": "c", "du": "\xff"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid UTF-8 \(byte 0xff at byte offset 45 of the file, "
                                          r"column 20\)"):
        load_pairs(path)  # the BOM is skipped, and still counted in the byte offset
    path.write_bytes(b'\xef\xbb\xbf{"en": "a", "du": "b"}\n')
    assert [(p.source, p.target) for p in load_pairs(path)] == [("a", "b")] and check_pairs(path) == 1
    path.write_bytes(b'{"en": "a", "du": "b"}\n' + b" " * (MAX_LINE_CHARS + 1) + b"\n")
    with pytest.raises(DataError, match=rf"{path}:2: a line of more than"):
        check_pairs(path)
    path.write_bytes(b'{"en": "a\\ud800", "du": "b"}\n')
    with pytest.raises(DataError, match=rf"{path}:1: field 'en' holds an unpaired surrogate"):
        check_pairs(path)
