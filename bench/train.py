"""Benchmark: RCT_PD training throughput and peak memory, the project's resident path against the seed's loop.

- project: the memory resident on the device (:class:`pema.adapter.resident.ResidentMemory`, a randperm per epoch),
  :func:`pema.adapter.train.phase_losses` (phase ``rct_pd``, kappa 0.2) and the AdamW step over A and B_pd exactly as
  :func:`pema.adapter.train.train_phase` runs it (``zero_grad``, ``backward``, ``step``, ``loss.item()``), with the
  output head frozen. Variants: ``fp32`` (float32 keys, no autocast); ``bf16`` (bfloat16 keys, ``torch.autocast``
  bfloat16 around the loss); ``bf16h`` (as bf16, and the LM head weight stored in bfloat16 so autocast does not
  re-cast it every step). With ``--via-parquet`` (CPU default) the memory is written with MemoryWriter and loaded
  with ``ResidentMemory.from_reader``, otherwise built from the random arrays directly.
- seed: as the seed's train_rct_pd.py method 3: float32 throughout, a torch Dataset that reads ONE row at a time
  from np.memmap key/value files, DataLoader(batch_size, num_workers=3, no shuffle), a LoraLinear that holds an
  unused d x d nn.Linear and applies dropout and A twice, the batch copied to the device twice, Adam.

Rates are rows per second over timed steps after warm-up steps. Peak memory: CUDA max_memory_allocated over the
path's setup + steps (the project's resident memory included); CPU: the process's peak RSS above its size at the
path's start (DataLoader worker processes not included).

    python bench/train.py            # CPU: SmolLM2 shapes (d 576, vocab 49152), rank 512
    python bench/train.py --gpu      # CUDA: OPT-1.3B shapes (d 2048, vocab 50272), rank 512, batch 4096

Prints progress to stderr and ONE JSON object as the last line of stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # bench/ (for `common`) and the repo root (for `pema`)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from common import PeakMemory, device_name, emit, free_device_memory, log, pick_device, rate, timed_steps  # noqa: E402

VARIANTS = ("fp32", "bf16", "bf16h")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="run on CUDA with OPT-1.3B shapes")
    p.add_argument("--d", type=int, default=None, help="key width (default 576 CPU, 2048 --gpu)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 49152 CPU, 50272 --gpu)")
    p.add_argument("--rank", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=None, help="rows per step, both paths (default 256 CPU, 4096 --gpu)")
    p.add_argument("--rows", type=int, default=None, help="memory rows (default 4096 CPU, 131072 --gpu)")
    p.add_argument("--norm", choices=["rms", "layer"], default=None, help="final norm type (default rms CPU "
                   "(SmolLM2), layer --gpu (OPT))")
    p.add_argument("--variants", default=None, help=f"comma-separated project variants from {VARIANTS}; the LAST one "
                   "is reported as project_entries_per_s (default fp32 CPU, fp32,bf16,bf16h --gpu)")
    p.add_argument("--steps", type=int, default=None, help="timed project steps (default 12 CPU, 150 --gpu)")
    p.add_argument("--seed-steps", type=int, default=None, help="timed seed steps (default 12 CPU, 20 --gpu)")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=None, help="seed DataLoader workers (seed: 3; default 2 CPU)")
    p.add_argument("--via-parquet", action=argparse.BooleanOptionalAction, default=None,
                   help="load the project's memory through MemoryWriter/MemoryReader (needs pyarrow; default on CPU)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="run each path in a fresh child process so that CPU peak RSS is not hidden by memory the "
                        "previous path freed (default on CPU, off with --gpu)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # internal: one path, for --isolate
    p.add_argument("--kappa", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    gpu = args.gpu
    defaults = dict(d=(2048, 576), vocab=(50272, 49152), batch_size=(4096, 256), rows=(131072, 4096),
                    norm=("layer", "rms"), variants=("fp32,bf16,bf16h", "fp32"), steps=(150, 12), seed_steps=(20, 12),
                    num_workers=(3, 2), via_parquet=(False, True), isolate=(False, True))
    for name, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants or any(v not in VARIANTS for v in args.variants):
        p.error(f"--variants must name some of {VARIANTS}, got {args.variants}")
    for name in ("d", "vocab", "rank", "batch_size", "rows", "steps", "seed_steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.warmup_steps < 0 or args.num_workers < 0:
        p.error("--warmup-steps and --num-workers must be >= 0")
    if args.rows < args.batch_size:
        p.error(f"--rows {args.rows} must be >= --batch-size {args.batch_size}")
    return args


def random_memory(rows: int, d: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """keys (rows, d) float32 with unit RMS (like real keys); tokens (rows,) int64 uniform over the vocabulary."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((rows, d), dtype=np.float32)
    keys /= np.sqrt((keys ** 2).mean(-1, keepdims=True))
    return keys, rng.integers(0, vocab, size=rows, dtype=np.int64)


def head_weights(d: int, vocab: int, norm: str, seed: int) -> dict[str, torch.Tensor]:
    """Random head weights on the host, drawn in place (no vocab x d temporaries to inflate peak memory)."""
    g = torch.Generator().manual_seed(seed)
    w = {"norm_weight": torch.randn(d, generator=g).mul_(0.1).add_(1.0),
         "lm_head_weight": torch.randn(vocab, d, generator=g).mul_(0.02)}
    if norm == "layer":
        w["norm_bias"] = torch.randn(d, generator=g).mul_(0.01)
    return w


# ------------------------------------------------------------------------------------------------------------------
# project path
# ------------------------------------------------------------------------------------------------------------------

def project_path(args, variant: str, keys: np.ndarray, tokens: np.ndarray, device: torch.device, tmp: str) -> dict:
    from pema.adapter.head import OutputHead
    from pema.adapter.model import PemaAdapter
    from pema.adapter.resident import ResidentMemory
    from pema.adapter.train import PHASES, phase_losses

    key_dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if variant != "fp32"
                else contextlib.nullcontext())
    reader = parquet_memory(keys, tokens, args, os.path.join(tmp, f"mem-{variant}")) if args.via_parquet else None
    with PeakMemory(device) as peak:  # from loading the memory to the last step
        t0 = time.perf_counter()
        if reader is not None:
            mem = ResidentMemory.from_reader(reader, device, key_dtype)
        else:
            mem = ResidentMemory(torch.from_numpy(keys).to(device=device, dtype=key_dtype),
                                 torch.from_numpy(tokens).to(device))
        load_s = time.perf_counter() - t0
        head = OutputHead(norm_type=args.norm, eps=1e-5, **head_weights(args.d, args.vocab, args.norm, args.seed))
        head = head.to(device).requires_grad_(False)
        if variant == "bf16h":
            head.lm_head_weight = head.lm_head_weight.to(torch.bfloat16)
        torch.manual_seed(args.seed)
        adapter = PemaAdapter(args.d, args.rank, alpha=1.0, dropout=0.2).to(device).train()
        for name, param in adapter.named_parameters():  # as train_phase does for rct_pd: B_rct frozen
            param.requires_grad_(name in PHASES["rct_pd"])
        opt = torch.optim.AdamW([getattr(adapter, n) for n in PHASES["rct_pd"]], lr=1e-4)

        def batches():
            epoch = 0
            while True:
                yield from mem.batches(args.batch_size, seed=epoch)
                epoch += 1

        stream = batches()

        def step() -> int:
            batch = next(stream)
            with autocast:
                loss = phase_losses(adapter, head, batch, "rct_pd", args.kappa)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = loss.item()  # train_phase reads the loss every step
            if not math.isfinite(value):
                raise FloatingPointError(f"project {variant}: loss {value}")
            return len(batch["token"])

        rows, seconds = timed_steps(step, warmup=args.warmup_steps, steps=args.steps, device=device)
    out = {"entries_per_s": rate(rows, seconds), "peak_mem_mb": peak.peak_mb, "rows": rows,
           "seconds": seconds, "load_s": load_s, "resident_mb": mem.nbytes / 2**20}
    log(f"project {variant}: {rows} rows in {seconds:.2f}s -> {out['entries_per_s']:,.0f} rows/s, "
        f"peak {peak.peak_mb:,.0f} MiB (resident memory {out['resident_mb']:,.0f} MiB, loaded in {load_s:.2f}s)")
    del mem, head, adapter, opt, stream
    free_device_memory(device)
    return out


def parquet_memory(keys, tokens, args, path):
    """Write the random memory as the project's Parquet memory (float16 keys); returns a MemoryReader."""
    try:
        from pema.formats.memory import MemoryReader
        from pema.formats.memory_writer import MemoryWriter
    except ImportError as e:
        raise SystemExit(f"--via-parquet needs pyarrow ({e}); run with --no-via-parquet") from e
    rows = len(tokens)
    with MemoryWriter(path, d=args.d, vocab_size=args.vocab, dtype="float16", rows_per_part=65536,
                      model_id="bench", model_revision=None, tokenizer_hash="bench", template="{en}",
                      key_definition="random unit-RMS") as writer:
        writer.add(key=keys, token=tokens, example=np.arange(rows), position=np.zeros(rows, np.int64))
        writer.close(num_examples=rows, source_tokens=rows)
    return MemoryReader(path)


# ------------------------------------------------------------------------------------------------------------------
# seed path (train_rct_pd.py, method 3)
# ------------------------------------------------------------------------------------------------------------------

class SeedDataset(torch.utils.data.Dataset):
    """The seed's CustomDataset: one row per __getitem__ from np.memmap files."""

    def __init__(self, key_path, val_path, size, dim):
        self.keys = np.memmap(key_path, dtype=np.float32, mode="r", shape=(size, dim))
        self.vals = np.memmap(val_path, dtype=np.int32, mode="r", shape=(size, 1))
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return torch.from_numpy(np.array(self.keys[index])), torch.from_numpy(np.array(self.vals[index]))


class SeedLoraLinear(nn.Linear):
    """The seed's LoraLinear: an nn.Linear(d, d) whose weight is never used, plus lora_A (r, d), lora_B (d, r)."""

    def __init__(self, d, r, alpha=1, dropout=0.2):
        nn.Linear.__init__(self, d, d)
        self.r, self.lora_dropout, self.scaling = r, nn.Dropout(dropout), alpha / r
        self.lora_A = nn.Parameter(self.weight.new_zeros((r, d)))
        self.lora_B = nn.Parameter(self.weight.new_zeros((d, r)))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        result = (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling
        r_result = (self.lora_dropout(x) @ self.lora_A.T) * self.scaling
        return result, r_result


def write_seed_files(keys: np.ndarray, tokens: np.ndarray, tmp: str) -> tuple[str, str]:
    key_path, val_path = os.path.join(tmp, "dstore_keys.npy"), os.path.join(tmp, "dstore_vals.npy")
    mk = np.memmap(key_path, dtype=np.float32, mode="w+", shape=keys.shape)
    for s in range(0, len(keys), 65536):
        mk[s:s + 65536] = keys[s:s + 65536]
    mk.flush()
    mv = np.memmap(val_path, dtype=np.int32, mode="w+", shape=(len(tokens), 1))
    mv[:, 0] = tokens
    mv.flush()
    del mk, mv
    return key_path, val_path


def seed_path(args, keys: np.ndarray, tokens: np.ndarray, device: torch.device, tmp: str) -> dict:
    key_path, val_path = write_seed_files(keys, tokens, tmp)
    with PeakMemory(device) as peak:
        hw = head_weights(args.d, args.vocab, args.norm, args.seed)
        loader = torch.utils.data.DataLoader(SeedDataset(key_path, val_path, len(tokens), args.d),
                                             batch_size=args.batch_size, num_workers=args.num_workers)
        norm = (nn.LayerNorm(args.d, eps=1e-5) if args.norm == "layer" else nn.RMSNorm(args.d, eps=1e-5)).to(device)
        with torch.no_grad():
            norm.weight.copy_(hw["norm_weight"])
            if args.norm == "layer":
                norm.bias.copy_(hw["norm_bias"])
        norm.requires_grad_(False)
        lm_head = nn.Linear(args.d, args.vocab, bias=False, device="meta")  # weight set below, allocated once
        lm_head.weight = nn.Parameter(hw.pop("lm_head_weight").to(device), requires_grad=False)
        torch.manual_seed(args.seed)
        lora_task_1 = SeedLoraLinear(args.d, args.rank).to(device)  # phase 1 result: only its lora_B is used
        with torch.no_grad():
            nn.init.kaiming_uniform_(lora_task_1.lora_B, a=math.sqrt(5))  # stands in for the loaded RCT checkpoint
        lora_task_1.lora_B.requires_grad_(False)
        model = SeedLoraLinear(args.d, args.rank).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def batches():
            while True:
                yield from loader  # a new pass (and new workers) per epoch, as the seed's epoch loop

        stream = batches()

        def step() -> int:
            features, labels = next(stream)
            optimizer.zero_grad()
            y_dec_pred, r_y_pred = model(features.to(device))
            y_ae_pred = r_y_pred @ lora_task_1.lora_B.T
            loss_1 = F.mse_loss(y_ae_pred.reshape(-1), features.reshape(-1).to(device))
            lm_output = lm_head(norm(y_dec_pred))
            loss_2 = F.cross_entropy(lm_output, labels.reshape(-1).to(torch.long).to(device))
            total_loss = args.kappa * loss_1 + (1 - args.kappa) * loss_2
            value = total_loss.item()  # the seed reads it three times (sum, print, tensorboard)
            total_loss.backward()
            optimizer.step()
            if not math.isfinite(value):
                raise FloatingPointError(f"seed: loss {value}")
            return len(labels)

        rows, seconds = timed_steps(step, warmup=args.warmup_steps, steps=args.seed_steps, device=device)
        del stream  # stops the DataLoader workers
    out = {"entries_per_s": rate(rows, seconds), "peak_mem_mb": peak.peak_mb, "rows": rows,
           "seconds": seconds}
    log(f"seed: {rows} rows in {seconds:.2f}s -> {out['entries_per_s']:,.0f} rows/s, "
        f"peak {peak.peak_mb:,.0f} MiB")
    return out


def run_path(args, name: str, keys, tokens, device) -> dict:
    with tempfile.TemporaryDirectory(prefix="pema-bench-train-") as tmp:
        if name == "seed":
            return seed_path(args, keys, tokens, device, tmp)
        return project_path(args, name, keys, tokens, device, tmp)


def run_child(argv: list[str], name: str) -> dict:
    """Run one path in a fresh interpreter (``--only name``); its progress goes to our stderr."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--only", name, "--no-isolate"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child for {name!r} failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = pick_device(args.gpu)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [*args.variants, "seed"]
    if args.only is not None and args.only not in names:
        raise SystemExit(f"--only {args.only!r} is not one of {names}")
    if args.only is None:
        log(f"device {device_name(device)}; d={args.d} vocab={args.vocab} rank={args.rank} "
            f"batch={args.batch_size} rows={args.rows}")
    if args.isolate and args.only is None:
        paths = {name: run_child(argv, name) for name in names}
    else:
        t0 = time.perf_counter()
        keys, tokens = random_memory(args.rows, args.d, args.vocab, args.seed)
        log(f"random memory ready in {time.perf_counter() - t0:.1f}s")
        todo = names if args.only is None else [args.only]
        paths = {name: run_path(args, name, keys, tokens, device) for name in todo}
        if args.only is not None:
            emit(paths[args.only])
            return paths[args.only]
    seed = paths.pop("seed")
    variants = paths
    result = {"device": device_name(device), "d": args.d, "vocab": args.vocab, "rank": args.rank,
              "batch_size": args.batch_size, "rows": args.rows, "norm": args.norm, "kappa": args.kappa}
    main_variant = variants[args.variants[-1]]
    result.update(project_variant=args.variants[-1], project_entries_per_s=main_variant["entries_per_s"],
                  seed_entries_per_s=seed["entries_per_s"],
                  ratio=main_variant["entries_per_s"] / seed["entries_per_s"],
                  project_peak_mem_mb=main_variant["peak_mem_mb"], seed_peak_mem_mb=seed["peak_mem_mb"],
                  project_resident_mb=main_variant["resident_mb"], project_variants=variants,
                  seed_num_workers=args.num_workers)
    emit(result)
    return result


if __name__ == "__main__":
    main()
