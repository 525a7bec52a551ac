"""The PLM owner's memory build on Ray Data (pema.executors.ray_build, jobs/build_memory.py), on a real local
cluster with the smoke config's tiny random Llama. Small parts (memory.rows_per_part=64, batch_tokens=256) give
several parts from a few pairs."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pema.config import load_config
from pema.errors import ConfigError, DataError, MemoryFormatError
from pema.formats.memory import MANIFEST_NAME, VERIFIED_NAME, MemoryReader, read_manifest, verify_memory
from pema.formats.tasks import load_pairs, resolve_template, use_chat_template
from pema.stages.inputs import split_pairs

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
SMALL_PARTS = ["memory.rows_per_part=64", "memory.batch_tokens=256"]


def config(*overrides: str):
    return load_config(SMOKE, [*SMALL_PARTS, *overrides])


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_rows(tokenizer, cfg, pairs) -> int:
    from pema.owner.build import prepare_examples

    chat = use_chat_template(tokenizer, cfg.model.prompt_format)
    examples, _ = prepare_examples(tokenizer, pairs, template=resolve_template(cfg.data.template),
                                   source_field=cfg.data.source_field, chat=chat)
    return sum(len(e.target_ids) for e in examples)


def assert_one_row_per_target(rows: dict, total: int) -> None:
    pairs = set(zip(rows["example"].tolist(), rows["position"].tolist()))
    assert len(rows["token"]) == total and len(pairs) == total, "missing or duplicate (example, position)"


@pytest.fixture(scope="module")
def pairs():
    return load_pairs(ROOT / "data" / "wmt22" / "train.jsonl", limit=24)



def build_memory_ray(cfg, pairs, out_dir, *, progress=False):
    """The build stage on the Ray executor."""
    from pema.executors.ray_executor import RayExecutor
    from pema.stages.build import build_memory

    return build_memory(cfg, pairs, out_dir, RayExecutor(), progress=progress)


@pytest.fixture(scope="module")
def two_actor_build(ray_client, pairs, tmp_path_factory):
    """One build sharded over 2 CPU actors, shared by the tests that compare against it."""
    out = tmp_path_factory.mktemp("two_actors") / "train"
    cfg = config("resources.memory_actors=2", "resources.cpus_per_actor=1")
    return cfg, build_memory_ray(cfg, pairs, out, progress=False), out


@pytest.mark.timeout(240)
def test_two_actors_equal_the_single_process_build(two_actor_build, pairs, smollm2_tokenizer, tmp_path):
    from pema.executors.inline import InlineExecutor
    from pema.stages.build import build_memory

    cfg, manifest, out = two_actor_build
    tok = smollm2_tokenizer
    ref_manifest = build_memory(cfg, pairs, tmp_path / "ref", InlineExecutor(), progress=False)
    total = expected_rows(tok, cfg, pairs)
    assert manifest.total_rows == ref_manifest.total_rows == total
    assert len(manifest.parts) > 2 and verify_memory(out) == manifest
    assert all(p.rows >= cfg.memory.rows_per_part for p in manifest.parts[:-1])
    for field in ("d", "vocab_size", "dtype", "tokenizer_hash", "template", "num_examples", "source_tokens"):
        assert getattr(manifest, field) == getattr(ref_manifest, field), field
    assert manifest.extra == ref_manifest.extra  # the same plan: the same fingerprint
    assert sorted(os.listdir(out)) == sorted([MANIFEST_NAME, VERIFIED_NAME, "versions", manifest.extra["examples"]]
                                             + [p.file for p in manifest.parts])  # version 1 (formats/versions)

    ray_rows, ref_rows = MemoryReader(out).read_all(), MemoryReader(tmp_path / "ref").read_all()
    assert_one_row_per_target(ray_rows, total)
    index = {(e, p): i for i, (e, p) in enumerate(zip(ref_rows["example"].tolist(), ref_rows["position"].tolist()))}
    at = np.array([index[(e, p)] for e, p in zip(ray_rows["example"].tolist(), ray_rows["position"].tolist())])
    np.testing.assert_array_equal(ray_rows["token"], ref_rows["token"][at])
    # tolerance: at most one float16 ulp of the reference value (same batches on the same CPU: in practice 0)
    ref_key = ref_rows["key"][at]
    ulp = np.spacing(np.abs(ref_key).astype(np.float16)).astype(np.float32)
    assert (np.abs(ray_rows["key"] - ref_key) <= ulp).all()


@pytest.mark.timeout(180)
def test_deterministic_whatever_the_actor_count(two_actor_build, pairs, tmp_path):
    """1 actor vs 2: the same parts bit for bit; a stale staging folder of other inputs is wiped first."""
    cfg, first, first_dir = two_actor_build
    # a staging folder left by a build of other inputs: its (self-consistent) part must not be kept
    stale = tmp_path / "train.partial"
    stale.mkdir()
    (stale / "plan.json").write_text(json.dumps({"fingerprint": "other inputs"}))
    (stale / "part-00000.parquet").write_bytes(b"stale")
    (stale / "part-00000.parquet.json").write_text(json.dumps(
        {"file": "part-00000.parquet", "rows": first.parts[0].rows, "sha256": sha256(stale / "part-00000.parquet"),
         "d": first.d, "vocab_size": first.vocab_size}))
    second = build_memory_ray(config("resources.memory_actors=1"), pairs, tmp_path / "train", progress=False)
    assert second == first  # same parts, sha256 sums, fingerprint
    a, b = MemoryReader(first_dir).read_all(), MemoryReader(tmp_path / "train").read_all()
    for column in a:
        np.testing.assert_array_equal(a[column], b[column])
    # an identical memory already in out_dir is returned as is
    mtimes = {p.file: os.stat(first_dir / p.file).st_mtime_ns for p in first.parts}
    assert build_memory_ray(cfg, pairs, first_dir, progress=False) == first
    assert mtimes == {p.file: os.stat(first_dir / p.file).st_mtime_ns for p in first.parts}


@pytest.mark.timeout(180)
def test_corrupt_missing_and_unfinished_parts_are_rebuilt(two_actor_build, pairs, tmp_path):
    """An interrupted build in ``<out>.partial``: parts with sidecars (the documented staging layout), one part
    corrupted, one without its sidecar, one left as a .tmp. Only those three are rebuilt."""
    cfg, manifest, done = two_actor_build
    out = tmp_path / "train"
    staging = tmp_path / "train.partial"
    shutil.copytree(done, staging)
    (staging / MANIFEST_NAME).unlink()
    (staging / "plan.json").write_text(json.dumps({"fingerprint": manifest.extra["fingerprint"]}))
    for p in manifest.parts:
        side = {"file": p.file, "rows": p.rows, "sha256": p.sha256, "d": manifest.d, "vocab_size": manifest.vocab_size}
        (staging / (p.file + ".json")).write_text(json.dumps(side))
    corrupt, unsealed, unfinished = (manifest.parts[i].file for i in (0, 1, 2))
    data = bytearray((staging / corrupt).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (staging / corrupt).write_bytes(bytes(data))
    (staging / (unsealed + ".json")).unlink()
    os.replace(staging / unfinished, staging / (unfinished + ".tmp"))
    os.remove(staging / (unfinished + ".json"))
    kept = {p.file: os.stat(staging / p.file).st_mtime_ns for p in manifest.parts[3:]}

    rebuilt = build_memory_ray(cfg, pairs, out, progress=False)
    assert rebuilt == manifest and verify_memory(out) == manifest  # same sha256 sums: rebuilt bit for bit
    assert kept == {f: os.stat(out / f).st_mtime_ns for f in kept}, "intact parts must be kept, not rebuilt"
    assert sorted(os.listdir(out)) == sorted([MANIFEST_NAME, VERIFIED_NAME, "versions", manifest.extra["examples"]]
                                             + [p.file for p in manifest.parts])  # version 1 (formats/versions)
    assert not staging.exists()


@pytest.mark.timeout(300)
def test_sigkill_then_rerun_resumes(ray_client, smollm2_tokenizer, tmp_path):
    out = tmp_path / "run"
    overrides = [*SMALL_PARTS, "resources.memory_actors=1", "data.train_limit=200", "data.dev_limit=8"]
    cmd = [sys.executable, str(ROOT / "jobs" / "build_memory.py"), "--config", str(SMOKE), "--output-dir", str(out),
           "--no-progress", *overrides]
    staging = out / "memory" / "train.partial"
    log = open(tmp_path / "first.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ray_client.env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        while not list(staging.glob("part-*.parquet.json")):
            assert proc.poll() is None, f"the build exited early:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no part was finished within 150 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        log.close()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed; use more pairs"
    assert not (staging / MANIFEST_NAME).exists() and not (out / "memory" / "train").exists()
    finished = {}
    for side in staging.glob("part-*.parquet.json"):
        meta = json.loads(side.read_text())
        part = staging / meta["file"]
        if part.is_file() and sha256(part) == meta["sha256"]:
            finished[meta["file"]] = (meta["sha256"], os.stat(part).st_mtime_ns)
    assert finished

    done = subprocess.run(cmd, cwd=ROOT, env=ray_client.env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "max_restarts > 0" not in done.stderr and " E " not in done.stderr, done.stderr[-3000:]  # no error line
    result = json.loads(done.stdout.strip().splitlines()[-1])
    cfg = load_config(SMOKE, overrides)
    total = expected_rows(smollm2_tokenizer, cfg, split_pairs(cfg, "train"))  # after the pair hygiene (6 dropped)
    manifest = verify_memory(out / "memory" / "train")
    assert manifest.total_rows == result["train_rows"] == total and len(manifest.parts) > 20
    assert_one_row_per_target(MemoryReader(out / "memory" / "train").read_all(), total)
    assert read_manifest(out / "memory" / "dev").num_examples == 8
    assert (out / "head" / "head.json").is_file() and not staging.exists()
    for name, (digest, mtime) in finished.items():
        part = out / "memory" / "train" / name
        assert (sha256(part), os.stat(part).st_mtime_ns) == (digest, mtime), f"{name} was rebuilt, not kept"


@pytest.mark.timeout(120)
def test_bad_input_raises_named_errors_and_leaves_nothing(ray_client, pairs, tmp_path, capsys):
    out = tmp_path / "train"
    with pytest.raises(DataError, match="no pairs"):
        build_memory_ray(config(), [], out, progress=False)
    with pytest.raises(ConfigError, match=r"resources\.memory_actors=64"):
        build_memory_ray(config("resources.memory_actors=64"), pairs, out, progress=False)
    for bad in ("resources.memory_actors=-1", "resources.gpus_per_actor=0", "resources.cpus_per_actor=0"):
        with pytest.raises(ConfigError, match=bad.replace(".", r"\.")):
            config(bad)
    assert not out.exists() and not (tmp_path / "train.partial").exists()

    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    with pytest.raises(MemoryFormatError, match="not a directory"):
        build_memory_ray(config(), pairs, a_file, progress=False)

    spec = importlib.util.spec_from_file_location("build_memory_job", ROOT / "jobs" / "build_memory.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--config", str(SMOKE), "--output-dir", str(out), "resources.memory_actors=-1"]) == 2
    assert "error: resources.memory_actors=-1" in capsys.readouterr().err
    assert job.main(["--config", str(SMOKE), "--output-dir", str(out), "--train", str(tmp_path / "none.jsonl")]) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()


def test_only_rays_restart_warning_is_dropped_from_the_console(capfd):
    """Ray's core worker logs an error-level line when it creates Ray Data's restartable encoder actors (their map
    function is an object-store argument); the build drops exactly that line from file descriptor 2 and passes the
    rest through, partial bar lines and other error lines too."""
    from pema.executors.ray_build import RESTART_WARNING, dropped_lines

    warning = (b"[2026-12-06 16:57:00,155 E 31084 739] core_worker.cc:2465: Actor with class name: 'MapWorker("
               b"MapBatches(_EncodeActor))' and ID: '786045fc91d10e271fbd129b01000000' has constructor arguments in "
               b"the object store and max_restarts > 0. If the arguments in the object store go out of scope or are "
               b"lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more "
               b"details.\n")
    other = b"[2026-12-06 16:57:01,000 E 31084 739] core_worker.cc:999: a real error\n"
    capfd.readouterr()
    with dropped_lines(RESTART_WARNING):
        os.write(2, b"build memory: 10%\r")
        os.write(2, warning)
        os.write(2, b"build memory: 50%\r")  # what sys.stderr does outside pytest's capture
        os.write(2, other)
    assert capfd.readouterr().err == "build memory: 10%\rbuild memory: 50%\r" + other.decode()
