"""Benchmark: training from a memory larger than the training process's RAM, streaming against resident.

Builds a synthetic run folder (once; reused while its size matches): ``memory/train`` of ``--rows`` rows of width
``--d`` (random unit-RMS float16 keys, random tokens of a ``--vocab``-word vocabulary, parts of ``--part-rows``
rows written with :class:`pema.formats.memory_writer.MemoryWriter`), a small ``memory/dev`` and a random RMS head
bundle of the same d and vocabulary. Then it trains on it twice, each in a child process of its own, through the
train stage's own body (:func:`pema.stages.train.train_local`, one worker, CPU): ``train.streaming=on`` (the share
read a part at a time through a shuffle buffer of ``--buffer-rows`` rows) and ``train.streaming=off`` (the share
loaded into RAM as float32 first). One epoch of each phase of ``--method`` (default RCT alone, the cheapest step
per row, so the data path weighs most): every row of the memory passes through both paths.

Figures, per path: rows/s = rows trained / seconds inside the training phases (each phase's ``rows_per_s``:
its dev checks included, the resident path's load and the process start excluded); peak RSS = the child's
``ru_maxrss`` (the whole process: torch, pyarrow, the buffer or the resident memory). ``memory_bytes`` is the
Parquet memory on disk (float16 keys; the resident path holds twice that as float32).

    python bench/memory_scale.py --rows 10000000 --d 128    # about 2.6 GB of Parquet

Prints progress to stderr and ONE JSON object as the last line of stdout: ``rows``, ``memory_bytes``,
``memory_bytes_float32``, ``peak_rss_bytes`` (the streaming process), ``peak_rss_bytes_resident``,
``rows_per_s_streaming``, ``rows_per_s_resident``, ``ratio`` (streaming / resident), ``memory_over_rss``, and
``rows_per_cpu_s`` / ``ratio_cpu``: rows per CPU second of the phases (every thread of the child), a figure that
other jobs on the machine move far less than the wall-clock rate.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # bench/ (for `common`) and the repo root (for `pema`)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import emit, log  # noqa: E402
from pema.formats.bundle import HEAD_FORMAT, write_bundle  # noqa: E402
from pema.formats.layout import RunLayout  # noqa: E402
from pema.formats.memory import MemoryReader, read_manifest  # noqa: E402
from pema.formats.memory_writer import MemoryWriter  # noqa: E402

DEV_ROWS = 4096


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000, help="training memory rows")
    p.add_argument("--d", type=int, default=128, help="key width")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size of the head")
    p.add_argument("--rank", type=int, default=32, help="adapter rank")
    p.add_argument("--dropout", type=float, default=0.0, help="adapter.dropout (0: the rows/s of the data path, "
                   "not of dropout's random masks, which cost both paths alike)")
    p.add_argument("--batch-size", type=int, default=4096, help="train.batch_size")
    p.add_argument("--method", default="rct", choices=["rct", "rct_pd", "pd"], help="train.method")
    p.add_argument("--pd-vocab", default="full", choices=["full", "targets"], help="train.pd_vocab")
    p.add_argument("--buffer-rows", type=int, default=65536, help="train.stream_buffer_rows")
    p.add_argument("--part-rows", type=int, default=16384, help="memory.rows_per_part of the synthetic memory")
    p.add_argument("--dir", default=os.path.join(os.path.dirname(_HERE), "bench_out", "memory_scale"),
                   help="where the run folder is built (and reused)")
    p.add_argument("--paths", default="streaming,resident", help="which paths to train, in order")
    p.add_argument("--child", choices=["streaming", "resident"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(args) -> RunLayout:
    """The run folder: head/, memory/train (``--rows`` rows), memory/dev; kept when it already has that size."""
    layout = RunLayout(args.dir)
    try:
        m = read_manifest(layout.memory("train"))
        same = (m.total_rows, m.d, m.vocab_size, m.rows_per_part) == (args.rows, args.d, args.vocab, args.part_rows)
        if same and (layout.head / "head.json").is_file():
            log(f"[build] reusing {layout.memory('train')} ({m.total_rows:,} rows, d {m.d})")
            return layout
    except Exception:  # no memory yet, or a damaged one: write it again
        pass
    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    write_bundle(layout.head, "head", {"norm.weight": 1.0 + 0.1 * torch.randn(args.d, generator=g),
                                       "lm_head.weight": torch.randn(args.vocab, args.d, generator=g) / args.d ** 0.5},
                 {"format": HEAD_FORMAT, "version": 1, "model_id": "synthetic", "norm_type": "rms", "eps": 1e-6,
                  "d": args.d, "vocab_size": args.vocab, "logit_scale": 1.0, "tokenizer_hash": "none", "extra": {}})
    rng = np.random.default_rng(1)
    for name, rows in (("train", args.rows), ("dev", DEV_ROWS)):
        with MemoryWriter(layout.memory(name), d=args.d, vocab_size=args.vocab, dtype="float16",
                          rows_per_part=args.part_rows, model_id="synthetic", model_revision=None,
                          tokenizer_hash="none", template="{en}", key_definition="synthetic", overwrite=True) as w:
            for lo in range(0, rows, args.part_rows):
                n = min(args.part_rows, rows - lo)
                keys = rng.standard_normal((n, args.d), dtype=np.float32)  # unit RMS on average
                w.add(key=keys.astype(np.float16), token=rng.integers(0, args.vocab, n),
                      example=(lo + np.arange(n)) // 20, position=(lo + np.arange(n)) % 20)
                if name == "train" and (lo // args.part_rows) % 20 == 0:
                    log(f"[build] {lo + n:,} / {rows:,} rows")
            w.close(num_examples=(rows + 19) // 20, source_tokens=rows)
    MemoryReader(layout.memory("train"))  # hashes the parts once, so neither child's start-up does
    log(f"[build] wrote {layout.root} in {time.perf_counter() - start:.0f}s")
    return layout


def folder_bytes(path) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file() and e.name.endswith(".parquet"))


def child(args) -> dict:
    """One training run in this process: its rows/s inside the phases, start-up seconds and peak RSS."""
    import pema.stages.train as stage
    from pema.config import load_config

    def cpu_s() -> float:  # this process's CPU seconds, every thread (the reading thread too)
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    phases_cpu = []
    run_phases = stage.run_phases

    def timed_phases(*a, **kw):  # the CPU the phases take, not the start-up's (the resident load)
        before = cpu_s()
        try:
            return run_phases(*a, **kw)
        finally:
            phases_cpu.append(cpu_s() - before)

    stage.run_phases = timed_phases
    start = time.perf_counter()
    cfg = load_config(None, [
        f"train.method={args.method}", "train.rct_epochs=1", "train.epochs=1", f"train.batch_size={args.batch_size}",
        f"train.pd_vocab={args.pd_vocab}", "train.evals_per_epoch=1", "train.distill_beta=0", "train.resident=false",
        f"train.b_pd_init={'from_rct' if args.method == 'rct_pd' else 'random'}",
        f"train.streaming={'on' if args.child == 'streaming' else 'off'}",
        f"train.stream_buffer_rows={args.buffer_rows}", f"adapter.rank={args.rank}", f"adapter.dropout={args.dropout}",
        "resources.device=cpu"])
    result = stage.train_local(cfg, args.dir, progress=False)
    wall = time.perf_counter() - start
    rows = sum(p["rows_per_s"] * p["seconds"] for p in result.phases)
    train_s = sum(p["seconds"] for p in result.phases)
    return {"train_memory": result.train_memory, "rows_trained": round(rows), "train_s": round(train_s, 2),
            "rows_per_s": rows / train_s, "startup_s": round(wall - train_s, 2),
            "phases_cpu_s": round(sum(phases_cpu), 2), "rows_per_cpu_s": rows / sum(phases_cpu),
            "phases": {p["phase"]: round(p["rows_per_s"]) for p in result.phases},
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB


def run_child(args, path: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--child", path, "--dir", args.dir,
            "--method", args.method, "--pd-vocab", args.pd_vocab, "--rank", str(args.rank),
            "--dropout", str(args.dropout),
            "--batch-size", str(args.batch_size), "--buffer-rows", str(args.buffer_rows)]
    log(f"[{path}] training in a child process ...")
    out = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    log(f"[{path}] {json.dumps(res)}")
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        torch.manual_seed(0)
        emit(child(args))
        return
    layout = build(args)
    res = {p: run_child(args, p) for p in args.paths.split(",") if p}  # --paths "": build only
    s, r = res.get("streaming", {}), res.get("resident", {})
    disk = folder_bytes(layout.memory("train"))
    emit({"rows": args.rows, "d": args.d, "vocab": args.vocab, "method": args.method, "batch_size": args.batch_size,
          "buffer_rows": args.buffer_rows, "memory_bytes": disk, "memory_bytes_is": "parquet on disk (float16 keys)",
          "memory_bytes_float32": args.rows * args.d * 4, "peak_rss_bytes": s.get("peak_rss_bytes"),
          "peak_rss_bytes_resident": r.get("peak_rss_bytes"),
          "rows_per_s_streaming": round(s["rows_per_s"]) if s else None,
          "rows_per_s_resident": round(r["rows_per_s"]) if r else None,
          "ratio": round(s["rows_per_s"] / r["rows_per_s"], 3) if s and r else None,
          "rows_per_cpu_s": {k: round(v["rows_per_cpu_s"]) for k, v in res.items()},
          "ratio_cpu": round(s["rows_per_cpu_s"] / r["rows_per_cpu_s"], 3) if s and r else None,
          "memory_over_rss": round(disk / s["peak_rss_bytes"], 2) if s else None,
          "startup_s": {k: v["startup_s"] for k, v in res.items()}, "phases": {k: v["phases"] for k, v in res.items()},
          "cpu": os.cpu_count(), "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
