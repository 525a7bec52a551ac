"""Corrupted and partly written files (issue 14, item 2): every reader names the file and what is wrong, a stage
that can rebuild does, and a write that fails part-way (a full disk, simulated with RLIMIT_FSIZE in a subprocess)
leaves no half file in a final place, and the rerun gives what an uninterrupted run gives.

One smoke run on tiny://llama (inline executor, several memory parts) is the reference; every case works on a copy
of it."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pema.adapter.io import load_adapter, load_head
from pema.config import load_config
from pema.errors import MemoryFormatError, MemoryMismatchError, PemaError
from pema.executors.inline import InlineExecutor
from pema.formats.memory import MemoryReader, verify_memory
from pema.stages.build import _MemoryBuild, _tokenizer, run_build
from pema.stages.inputs import split_pairs
from pema.stages.train import run_train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
OVERRIDES = [f"data.{s}={ROOT / 'data' / 'wmt22' / (s + '.jsonl')}" for s in ("train", "dev", "test")] + [
    "memory.rows_per_part=96", "memory.batch_tokens=256"]  # several parts per memory


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The uninterrupted run: memory/{train,dev}, head/, adapter/."""
    out = tmp_path_factory.mktemp("ref")
    cfg = load_config(SMOKE, OVERRIDES)
    run_build(cfg, out, InlineExecutor(), progress=False)
    run_train(cfg, out, InlineExecutor(), progress=False)
    assert len(MemoryReader(out / "memory" / "train").manifest.parts) >= 3
    return out, cfg


def _copy(ref_out: Path, dest: Path, *names: str) -> Path:
    for name in names:
        shutil.copytree(ref_out / name, dest / name)
    return dest


def _named(exc: BaseException, *texts) -> None:
    """A PemaError whose message names each of ``texts`` (paths, values); no raw pyarrow/safetensors/json error."""
    assert isinstance(exc, PemaError), f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    for text in texts:
        assert str(text) in str(exc), f"{text!r} not in: {exc}"


# ------------------------------------------------------------------------------------------------------------------
# memory parts and manifests
# ------------------------------------------------------------------------------------------------------------------

def _cut(path: Path, where: str) -> None:
    data = path.read_bytes()
    footer = int.from_bytes(data[-8:-4], "little")  # Parquet: ... footer, footer length (4 bytes), "PAR1"
    n = {"0 bytes": 0, "mid-footer": len(data) - 8 - footer // 2, "mid-data": len(data) // 2,
         "last byte": len(data) - 1}[where]
    path.write_bytes(data[:n])


def _flip(path: Path, keep_mtime: bool) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x5A  # inside the key data
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(data)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # size, mtime and inode as when it was verified


def _edit_manifest(mem: Path, edit) -> None:
    path = mem / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _set(doc: dict, **kw) -> None:
    doc.update(kw)


PART = "part-00001.parquet"
PART_FAULTS = {
    **{f"part cut at {w}": (lambda m, w=w: _cut(m / PART, w)) for w in ("0 bytes", "mid-footer", "mid-data",
                                                                        "last byte")},
    "part bytes flipped": lambda m: _flip(m / PART, keep_mtime=False),
    "part bytes flipped, old mtime put back after a cached verify": lambda m: _flip(m / PART, keep_mtime=True),
    "part missing": lambda m: (m / PART).unlink(),
    "part replaced by another part": lambda m: shutil.copy(m / "part-00000.parquet", m / PART),
}
MANIFEST_FAULTS = {  # fault -> (edit, what the message must name besides the file)
    "manifest d wrong": (lambda doc: _set(doc, d=doc["d"] + 1), "d=65"),
    "manifest dtype wrong": (lambda doc: _set(doc, dtype="float32"), "float32"),
    "manifest d not a number": (lambda doc: _set(doc, d="64"), "d='64'"),
    "manifest part rows wrong": (lambda doc: (doc["parts"][1].update(rows=doc["parts"][1]["rows"] + 1),
                                              _set(doc, total_rows=doc["total_rows"] + 1)), "rows"),
    "manifest total_rows wrong": (lambda doc: _set(doc, total_rows=doc["total_rows"] - 1), "total_rows"),
    "manifest checksum wrong": (lambda doc: doc["parts"][1].update(sha256="0" * 64), "sha256"),
    "manifest vocab_size below the token ids": (lambda doc: _set(doc, vocab_size=10), "vocab_size=10"),
    "manifest part list not a list": (lambda doc: _set(doc, parts={"a": 1}), "parts"),
}


@pytest.mark.parametrize("fault", list(PART_FAULTS))
def test_damaged_part_is_named(ref, tmp_path, fault):
    mem = _copy(ref[0], tmp_path, "memory/train") / "memory" / "train"
    verify_memory(mem)  # .verified.json now trusts every part: a stale entry must not hide the damage
    PART_FAULTS[fault](mem)
    part = mem / PART
    with pytest.raises(MemoryFormatError) as err:
        MemoryReader(mem)
    _named(err.value, part, "pema build")
    if "flipped" not in fault and "replaced" not in fault:  # damage the footer or the size shows, unhashed
        with pytest.raises(MemoryFormatError) as err:
            MemoryReader(mem, verify=False).read_all()
        _named(err.value, part)


@pytest.mark.parametrize("fault", list(MANIFEST_FAULTS))
def test_edited_manifest_is_named(ref, tmp_path, fault):
    mem = _copy(ref[0], tmp_path, "memory/train") / "memory" / "train"
    edit, text = MANIFEST_FAULTS[fault]
    _edit_manifest(mem, edit)
    with pytest.raises(MemoryFormatError) as err:
        MemoryReader(mem).read_all()
    _named(err.value, mem, text)


@pytest.mark.parametrize("content", ["", '{"d": 64, ', "[1, 2]", b"\xff\xfe{}"])
def test_manifest_not_json_is_named(ref, tmp_path, content):
    mem = _copy(ref[0], tmp_path, "memory/train") / "memory" / "train"
    (mem / "manifest.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(MemoryFormatError) as err:
        verify_memory(mem)
    _named(err.value, mem / "manifest.json")


def test_build_rebuilds_what_is_damaged(ref, tmp_path):
    """A flipped part (cached as verified), a missing part, an edited fingerprint and a truncated head: the rerun
    of the build detects each, rebuilds it and gives the reference's files."""
    out, cfg = ref
    run = _copy(out, tmp_path / "run", "memory", "head")
    verify_memory(run / "memory" / "train")
    PART_FAULTS["part bytes flipped, old mtime put back after a cached verify"](run / "memory" / "train")
    (run / "memory" / "dev" / "part-00000.parquet").unlink()
    _cut_safetensors(run / "head" / "head.safetensors", "in the data")
    edited = _copy(out, tmp_path / "fp", "memory/train") / "memory" / "train"
    _edit_manifest(edited, lambda doc: doc["extra"].update(fingerprint="0" * 64))
    tokenizer = _tokenizer(cfg.model.model_id, cfg.model.revision)
    assert _MemoryBuild(cfg, tokenizer, split_pairs(cfg, "train"), out / "memory" / "train").existing()
    assert _MemoryBuild(cfg, tokenizer, split_pairs(cfg, "train"), edited).existing() is None  # not this build's
    run_build(cfg, run, InlineExecutor(), progress=False)
    _same_memory(run, out)
    assert _bytes(run / "head") == _bytes(out / "head")


# ------------------------------------------------------------------------------------------------------------------
# safetensors bundles and their JSON sidecars
# ------------------------------------------------------------------------------------------------------------------

def _cut_safetensors(path: Path, where: str) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")  # u64 header length, JSON header, tensor data
    path.write_bytes(data[:{"0 bytes": 0, "in the header length": 4, "in the JSON header": 8 + n // 2,
                            "in the data": 8 + n + (len(data) - 8 - n) // 2, "last byte": len(data) - 1}[where]])


def _edit_header(path: Path, edit) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def _shape(name: str, shape):
    return lambda h: h[name].update(shape=shape(h[name]["shape"]))


CUTS = ("0 bytes", "in the header length", "in the JSON header", "in the data", "last byte")
BUNDLE_FAULTS = {  # (bundle, fault) -> (damage, what the message must name)
    **{(b, f"safetensors cut {w}"): ((lambda p, b=b, w=w: _cut_safetensors(p / f"{b}.safetensors", w)),
                                     f"{b}.safetensors") for b in ("head", "adapter") for w in CUTS},
    ("adapter", "header: A's shape transposed (same bytes)"):
        (lambda p: _edit_header(p / "adapter.safetensors", _shape("A", lambda s: s[::-1])), "adapter.safetensors"),
    ("adapter", "header: A's shape larger than its data"):
        (lambda p: _edit_header(p / "adapter.safetensors", _shape("A", lambda s: [s[0], s[1] + 1])),
         "adapter.safetensors"),
    ("adapter", "header: A's dtype I32"):
        (lambda p: _edit_header(p / "adapter.safetensors", lambda h: h["A"].update(dtype="I32")), "int32"),
    ("head", "header: LM head reshaped (same bytes)"):
        (lambda p: _edit_header(p / "head.safetensors", _shape("lm_head.weight", lambda s: [s[0] * 2, s[1] // 2])),
         "head.safetensors"),
    ("head", "header: norm shape (1, d)"):
        (lambda p: _edit_header(p / "head.safetensors", _shape("norm.weight", lambda s: [1, *s])), "head.safetensors"),
    **{("adapter", f"adapter.json {k}={v!r}"): ((lambda p, k=k, v=v: _edit_json(p / "adapter.json", k, v)),
                                                f"{k}={v!r}" if k in ("d", "rank") and isinstance(v, int) else k)
       for k, v in (("d", 65), ("rank", 8), ("rank", "16"), ("rank", None), ("dropout", 1.5))},
    **{("head", f"head.json {k}={v!r}"): ((lambda p, k=k, v=v: _edit_json(p / "head.json", k, v)), k)
       for k, v in (("d", 65), ("vocab_size", 100), ("norm_type", "bogus"), ("eps", None))},
    **{(b, f"{b}.json not JSON"): ((lambda p, b=b: (p / f"{b}.json").write_text('{"format": ')), f"{b}.json")
       for b in ("head", "adapter")},
    **{(b, f"{b}.json a list"): ((lambda p, b=b: (p / f"{b}.json").write_text("[]")), f"{b}.json")
       for b in ("head", "adapter")},
}


def _edit_json(path: Path, key: str, value) -> None:
    doc = json.loads(path.read_text())
    if value is None:
        del doc[key]
    else:
        doc[key] = value
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("bundle, fault", list(BUNDLE_FAULTS))
def test_damaged_bundle_is_named(ref, tmp_path, bundle, fault):
    out = ref[0]
    _copy(out, tmp_path, bundle)
    damage, text = BUNDLE_FAULTS[bundle, fault]
    damage(tmp_path / bundle)
    _, head_meta = load_head(out / "head")
    readers = [lambda: load_head(tmp_path / "head")] if bundle == "head" else [
        lambda: load_adapter(tmp_path / "adapter"), lambda: load_adapter(tmp_path / "adapter", head_meta)]
    for read in readers:
        with pytest.raises(PemaError) as err:
            read()
        _named(err.value, tmp_path / bundle, text)
        if "json" in fault and ("d=" in fault or "vocab" in fault) and bundle == "head":
            assert isinstance(err.value, MemoryMismatchError)  # the JSON and the tensors disagree: both named


# ------------------------------------------------------------------------------------------------------------------
# writes that fail part-way (RLIMIT_FSIZE in a subprocess), then the rerun
# ------------------------------------------------------------------------------------------------------------------

CHILD = r"""
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with OSError EFBIG instead of killing us
from pema.config import load_config
from pema.executors.inline import InlineExecutor
import pema.executors.handoff as handoff, pema.stages.build as build, pema.stages.build_plan as plan
import pema.stages.train as train
cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

def full_disk(fn, limit, when=lambda *a, **k: True):
    calls = []
    def wrapped(*a, **k):
        if when(*a, **k):
            calls.append(1)
            if len(calls) == 1:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # files stop growing at `limit` bytes
        return fn(*a, **k)
    return wrapped

report = {}
for scenario, out in json.loads(sys.argv[3]).items():
    real = {n: getattr(m, n) for m, n in ((plan, "write_part"), (build, "export_head_files"),
                                          (build, "replace_dir"), (handoff, "save_adapter"))}
    if scenario == "memory part":  # the 2nd part of the train memory, 2 KiB into it
        plan.write_part = full_disk(real["write_part"], 2048, lambda path, **k: str(path).endswith("00001.parquet"))
        stage = build.run_build
    elif scenario == "head export":  # the PLM owner's export of head.safetensors, 1 MiB into it
        build.export_head_files = full_disk(real["export_head_files"], 1 << 20)
        stage = build.run_build
    elif scenario == "head written into place":  # the driver writing the exported bundle into head/
        build.replace_dir = full_disk(real["replace_dir"], 1 << 20, lambda dest, *a, **k: dest.name == "head")
        stage = build.run_build
    else:  # "adapter bundle": adapter.safetensors, 4 KiB into it
        handoff.save_adapter = full_disk(real["save_adapter"], 4096)
        stage = train.run_train
    try:
        stage(cfg, out, InlineExecutor(), progress=False)
        report[scenario] = None
    except Exception as exc:
        report[scenario] = f"{type(exc).__name__}: {exc}"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        for (m, n) in ((plan, "write_part"), (build, "export_head_files"), (build, "replace_dir"),
                       (handoff, "save_adapter")):
            setattr(m, n, real[n])
print(json.dumps(report))
"""
SCENARIOS = {"memory part": (), "head export": ("memory",), "head written into place": ("memory",),
             "adapter bundle": ("memory", "head")}


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def _same_memory(run: Path, out: Path) -> None:
    for split in ("train", "dev"):
        got, want = (MemoryReader(r / "memory" / split) for r in (run, out))
        assert got.manifest == want.manifest  # same parts, rows and sha256s
        rows, ref_rows = got.read_all(), want.read_all()
        for c in rows:
            np.testing.assert_array_equal(rows[c], ref_rows[c])
        pairs = rows["example"] * 100_000 + rows["position"]
        assert len(np.unique(pairs)) == len(pairs)  # no duplicate (example, position)


def _no_half_files(run: Path) -> list[str]:
    """Files in final places that are not whole: .tmp files outside a staging folder, and bundles or memories in
    their final folder that do not read back. Staging (``*.partial``) is allowed: the rerun cleans or reuses it."""
    bad = [str(p.relative_to(run)) for p in run.rglob("*.tmp")
           if not any(part.endswith(".partial") for part in p.relative_to(run).parts)]
    for mem in (run / "memory" / "train", run / "memory" / "dev"):
        if mem.exists():
            verify_memory(mem)
    if (run / "head").exists():
        load_head(run / "head")
    if (run / "adapter").exists():
        load_adapter(run / "adapter")
    return bad


def test_write_failing_part_way_then_rerun(ref, tmp_path):
    out, cfg = ref
    runs = {s: str(_copy(out, tmp_path / s.replace(" ", "_"), *names)) for s, names in SCENARIOS.items()}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(SMOKE), json.dumps(OVERRIDES), json.dumps(runs)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for scenario, run in ((s, Path(r)) for s, r in runs.items()):
        error = report[scenario]  # an OSError naming the file it could not write
        assert error.startswith("OSError: [Errno 27] cannot write /") and "too large" in error.lower(), error
        assert _no_half_files(run) == [], scenario
        if scenario == "memory part":  # parts 0 (train) stay staged for the resume; part 1 left nothing
            staged = sorted(p.name for p in (run / "memory" / "train.partial").iterdir())
            assert "part-00000.parquet" in staged and not any(n.startswith("part-00001") for n in staged)
            assert not (run / "memory" / "train").exists() and not (run / "head").exists()
        elif scenario == "adapter bundle":
            assert not (run / "adapter").exists()
        else:
            assert not (run / "head").exists() and not (run / "head.partial").exists()
        stage = run_train if scenario == "adapter bundle" else run_build
        stage(cfg, run, InlineExecutor(), progress=False)  # the rerun, without the limit
        assert _no_half_files(run) == [] and not list(run.rglob("*.partial")), scenario
        _same_memory(run, out)
        assert _bytes(run / "head") == _bytes(out / "head")
        if scenario == "adapter bundle":
            got, want = _bytes(run / "adapter"), _bytes(out / "adapter")
            assert got.pop("adapter.safetensors") == want.pop("adapter.safetensors")  # identical, byte for byte
            meta, ref_meta = (json.loads(x.pop("adapter.json")) for x in (got, want))
            assert meta.pop("memory")["path"] == str((run / "memory" / "train").resolve())  # its own memory
            ref_meta.pop("memory")
            assert meta == ref_meta and got == want


# ------------------------------------------------------------------------------------------------------------------
# the jobs: exit 2 with `error: ...`, no traceback
# ------------------------------------------------------------------------------------------------------------------

def test_train_job_names_a_damaged_head_or_memory(ref, tmp_path, monkeypatch, capsys):
    import pema.executors.ray_runtime as ray_runtime

    monkeypatch.setattr(ray_runtime, "init_ray", lambda *a, **k: {})  # nothing here needs the cluster
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = importlib.util.spec_from_file_location("train_job", ROOT / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    run = _copy(ref[0], tmp_path, "memory", "head")
    argv = ["--config", str(SMOKE), "--output-dir", str(run), "--no-progress", *OVERRIDES]
    _cut_safetensors(run / "head" / "head.safetensors", "in the data")
    code, err = job.main(argv), capsys.readouterr().err
    assert code == 2 and f"error: {run / 'head' / 'head.safetensors'} is not" in err and "Traceback" not in err, err
    shutil.copy(ref[0] / "head" / "head.safetensors", run / "head" / "head.safetensors")
    _cut(run / "memory" / "train" / PART, "mid-data")
    code, err = job.main(argv), capsys.readouterr().err
    assert code == 2 and f"error: part {run / 'memory' / 'train' / PART}" in err and "Traceback" not in err, err
    assert not (run / "adapter").exists()
    assert not (run / "mlflow.db").exists()  # refused by the input check, before the run's store is made


def test_evaluate_job_names_a_damaged_adapter_before_anything_is_written(ref, tmp_path, monkeypatch, capsys):
    import pema.executors.ray_runtime as ray_runtime

    monkeypatch.setattr(ray_runtime, "init_ray", lambda *a, **k: {})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = importlib.util.spec_from_file_location("evaluate_job", ROOT / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    run = _copy(ref[0], tmp_path, "memory", "head", "adapter")
    target = next((run / "adapter").glob("*.safetensors"))
    _cut_safetensors(target, "in the data")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    code = job.main(["--config", str(SMOKE), "--output-dir", str(run), "--no-progress", *OVERRIDES])
    err = capsys.readouterr().err
    assert code == 2 and str(target) in err and "Traceback" not in err, err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # no mlflow.db, no predictions


def test_a_full_disk_in_a_job_is_named_with_exit_2(tmp_path, capsys):
    import argparse
    import errno

    import pema.executors.ray_runtime as ray_runtime
    from pema.jobs.cli import run_job

    def stage(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "memory" / "part-00000.parquet"))

    args = argparse.Namespace(config=str(SMOKE), output_dir=str(tmp_path / "out"), overrides=[], input_splits=(),
                              address=None, verbose=False)
    real = ray_runtime.init_ray
    ray_runtime.init_ray = lambda *a, **k: {}
    try:
        code = run_job(args, stage, model=False)
    finally:
        ray_runtime.init_ray = real
    err = capsys.readouterr().err
    assert code == 2 and "part-00000.parquet" in err and "free some space" in err and "Traceback" not in err

