"""A wrong path on the command line is named with its option, before the job reads anything else (exit 2); a job
that needs the bundles of an earlier one says what the folder lacks and the command that makes it."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "jobs" / "configs" / "smoke.yaml")


def _main(command: str):
    import importlib

    return importlib.import_module(f"pema.commands.{command}").main


@pytest.mark.parametrize("command, args, expected", [
    ("run", ["--train", "{missing}"], "error: --train {missing}: no such file"),
    ("run", ["--dev", "{missing}"], "error: --dev {missing}: no such file"),
    ("run", ["--test", "{missing}"], "error: --test {missing}: no such file"),
    ("run", ["--ood-test", "{missing}"], "error: --ood-test {missing}: no such file"),
    ("evaluate", ["--test", "{folder}"], "error: --test {folder}: a folder, not a file"),
    ("build", ["--train", "{missing}"], "error: --train {missing}: no such file"),
    ("run", ["data.dev={missing}"], "error: data.dev {missing}: no such file (set by --config {config} or an "
                                    "override; --dev replaces it)"),
])
def test_a_missing_input_names_its_option(command, args, expected, tmp_path, capsys, monkeypatch):
    def no_ray(*a, **k):
        raise AssertionError("Ray was started for a job whose input is wrong")

    monkeypatch.setattr("pema.executors.ray_runtime.init_ray", no_ray)
    values = {"missing": str(tmp_path / "nope.jsonl"), "folder": str(tmp_path), "config": SMOKE}
    out = tmp_path / "out"
    rc = _main(command)(["--config", SMOKE, "--output-dir", str(out), *[a.format(**values) for a in args]])
    assert rc == 2
    assert capsys.readouterr().err.strip() == expected.format(**values)
    assert not out.exists()  # refused before anything was written


def test_a_missing_config_and_a_file_as_output_dir_name_their_options(tmp_path, capsys):
    from pema.commands.run import main

    assert main(["--config", str(tmp_path / "nope.yaml"), "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --config {tmp_path / 'nope.yaml'}: no such file"
    (tmp_path / "file").write_text("x")
    assert main(["--config", SMOKE, "--output-dir", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: --output-dir {tmp_path / 'file'}: ")


def test_train_on_an_empty_folder_says_what_is_missing_and_which_command_makes_it(tmp_path, capsys):
    from pema.commands.train import main

    assert main(["--config", SMOKE, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --output-dir {tmp_path} lacks [") and "(memory/train/, memory/dev/, head/)" in err
    assert err.endswith("make them with `pema build` on this --output-dir and the same --config"), err
    assert "jobs/" not in err


def test_the_command_fails_early(tmp_path):
    """Before the heavy imports (torch, Ray, MLflow): the whole command, interpreter start included."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pema", "run", "--config", SMOKE, "--output-dir", str(tmp_path / "o"),
                           "--train", str(tmp_path / "nope.jsonl")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == f"error: --train {tmp_path / 'nope.jsonl'}: no such file"
    assert "torch" not in done.stderr
    assert time.perf_counter() - start < 60  # 0.3 s here when idle; the 9.5 s before were torch's import
