"""What the fuzzer arranges around a case before the job runs, and undoes after (``Case.setup``):

- ``holder``: another live process holds ``@OUT@``'s lock (:class:`pema.jobs.guard.FolderLock`), as a second job
  would; its pid is the placeholder ``@HOLDER@`` of the case's patterns. It is killed after the case.
- ``read_only``: ``@OUT@`` cannot be written; ``read_only_parent``: ``@IN@/ro``, the folder ``--output-dir`` would
  be made in, cannot. Mode 0o555 for a user; for root, whom modes do not stop, the immutable attribute
  (``chattr +i``), which stops root too. Either way the harness first checks that a write there does fail: a
  folder that stays writable would test nothing, and the case is reported as skipped with the reason.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; sys.path.insert(0, sys.argv[2]); from pema.jobs.guard import FolderLock\n"
        "with FolderLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(900)")


class Unavailable(Exception):
    """The setup cannot be made real here (the case is skipped, with this reason)."""


@contextlib.contextmanager
def holder(folder: Path):
    """A process that holds ``folder``'s lock while the block runs; yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(ROOT)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "held":
            raise RuntimeError(f"the holding process did not take {folder}'s lock: {proc.stderr.read()[-500:]}")
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _chattr(flag: str, path: Path) -> subprocess.CompletedProcess | None:
    exe = shutil.which("chattr")
    return subprocess.run([exe, flag, str(path)], capture_output=True, text=True) if exe else None


def _writable(folder: Path) -> bool:
    probe = folder / f".fuzz-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return False
    probe.rmdir()
    return True


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` cannot be written while the block runs (see the module's note); yields how it was done."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        mode = folder.stat().st_mode & 0o7777
        folder.chmod(0o555)
        how, undo = "mode 0o555", lambda: folder.chmod(mode)
    else:
        done = _chattr("+i", folder)
        if done is None or done.returncode != 0:
            why = "no chattr" if done is None else done.stderr.strip()[:200]
            raise Unavailable(f"root ignores mode 0o555, and chattr +i {folder} failed ({why}): no way here to make "
                              "a folder read-only for root")
        how, undo = "chattr +i (root)", lambda: _chattr("-i", folder)
    try:
        if _writable(folder):
            raise Unavailable(f"{folder} stays writable after {how}")
        yield how
    finally:
        undo()


@contextlib.contextmanager
def arranged(setup: str, subs: dict[str, str]):
    """The case's ``setup`` around the block; yields more placeholders (``@HOLDER@``) and a note of how."""
    if not setup:
        yield {}, ""
    elif setup == "holder":
        with holder(Path(subs["@OUT@"])) as pid:
            yield {"@HOLDER@": str(pid)}, f"held by pid {pid}"
    elif setup in ("read_only", "read_only_parent"):
        folder = Path(subs["@OUT@"] if setup == "read_only" else subs["@IN@"] + "/ro")
        with read_only(folder) as how:
            yield {}, f"{folder.name} read-only by {how}"
    else:
        raise ValueError(f"unknown setup {setup!r}")
