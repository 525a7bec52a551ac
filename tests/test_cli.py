"""The ``pema`` command (pema/commands): ``pema --help`` lists every subcommand, ``pema <sub> --help`` is that job's
help, an unknown subcommand is a named error with exit 2, and ``python -m pema`` and the installed ``pema`` script
are the same command. (The smoke pipeline through ``python -m pema run`` is ``tests/test_ray_job.py``'s
``ray job submit``.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pema.commands import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
PEMA = Path(sys.executable).with_name("pema")  # the [project.scripts] entry point, installed with the package
JOBS = ("run", "build", "train", "evaluate", "compare", "tune", "register", "serve-owner", "serve-adapters")


def pema(*args, launcher=(sys.executable, "-m", "pema"), timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.parametrize("launcher", ["python -m pema", "pema"])
def test_help_lists_every_subcommand(launcher):
    if launcher == "pema":
        assert PEMA.is_file(), f"{PEMA} is missing: reinstall the package (make setup, or pip install -e .)"
    proc = pema("--help", launcher=(str(PEMA),) if launcher == "pema" else (sys.executable, "-m", "pema"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: pema <command>")
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS), proc.stdout
    assert {*JOBS, "split-heldout", "parallel-to-jsonl"} <= set(COMMANDS)
    for name, command in COMMANDS.items():
        assert f"  {name} " in proc.stdout and command.help in proc.stdout


def test_unknown_subcommand_is_a_named_error_with_exit_2():
    proc = pema("nosuch")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "error: unknown command 'nosuch'" in proc.stderr and "run, build, train" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    none = pema()
    assert none.returncode == 2 and "error: no command given" in none.stderr


def test_train_help_shows_the_jobs_options():
    proc = pema("train", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: pema train") and "--config" in proc.stdout and "--output-dir" in proc.stdout


def help_of(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as done:  # argparse's --help
        code = done.code
    return code, capsys.readouterr().out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_has_its_help(name, capsys):
    code, out = help_of([name, "--help"], capsys)
    assert code == 0 and f"pema {name}" in out, out[:300]
    if name in JOBS:  # the jobs share job_parser's options
        assert out.startswith(f"usage: pema {name}") and all(flag in out for flag in ("--config", "--output-dir",
                                                                                     "overrides")), out
    assert help_of(["help", name], capsys) == (code, out)  # pema help <name> is pema <name> --help


def test_run_refuses_a_bad_override_with_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "o"
    proc = pema("run", "--config", str(SMOKE), "--output-dir", str(out), "--no-progress", "decode.gu.lam_max=1.5")
    assert proc.returncode == 2 and "error: decode.gu.lam_max=1.5 is invalid" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "jobs").glob("*.py")))
def test_the_job_scripts_are_the_commands(script):
    # jobs/<name>.py is kept for scripts that call it: a shim onto pema.commands, without sys.path.insert
    text = (ROOT / "jobs" / script).read_text()
    assert "sys.path" not in text and "from pema.commands." in text and "import main" in text
    module = text.split("from pema.commands.")[1].split()[0]
    assert f"pema.commands.{module}" in {c.module for c in COMMANDS.values()}


def test_no_subcommand_is_listed_twice():
    # a dict literal keeps the last of two equal keys silently: read the table's source instead
    import ast

    import pema.commands

    tree = ast.parse(Path(pema.commands.__file__).read_text())
    table = next(node.value for node in ast.walk(tree) if isinstance(node, ast.AnnAssign)
                 and getattr(node.target, "id", None) == "COMMANDS")
    names = [key.value for key in table.keys]
    assert len(names) == len(set(names)) == len(COMMANDS), names
