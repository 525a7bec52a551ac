"""Quality levers on dev, measured: the script behind the README's "Making PEMA help" tables.

    # once: the owner's memories (first N training pairs, dev pairs 0-99 and 100-199) and the head
    .venv/bin/python bench/levers.py build --out bench_out/levers --train-pairs 1200
    # an adapter on the first P pairs' rows, with config overrides; prints dev CE, mixture CE per lam, stop stats
    .venv/bin/python bench/levers.py train --out bench_out/levers --name exact1200 --pairs 1200 train.rct_solver=exact
    # decode a split with several systems (the PLM loaded once); one JSON line per system
    .venv/bin/python bench/levers.py decode --out bench_out/levers --specs specs.json

A decode spec: ``{"name", "split": "dev" | "dev2" | "test", "adapter": NAME | null, "schedule": {kind, lam,
lam_max, floor, stop_lam} | null, "decode": {decode.* overrides}}`` ("dev" = dev pairs 0-99, "dev2" = 100-199,
"test" = the shipped test pairs 0-99). Results are appended to ``<out>/train_results.jsonl`` and
``<out>/decode_results.jsonl``; hypotheses go to ``<out>/preds/``. Runs on the CPU, in one process per command.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pema.adapter.io import load_adapter, load_head, save_adapter  # noqa: E402
from pema.adapter.model import PemaAdapter  # noqa: E402
from pema.adapter.phases import run_phases  # noqa: E402
from pema.adapter.resident import ResidentMemory  # noqa: E402
from pema.config import ScheduleConfig, load_config  # noqa: E402
from pema.stages.scoring import score  # noqa: E402
from pema.formats.memory import MemoryReader  # noqa: E402
from pema.formats.tasks import Pair, load_pairs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jobs" / "configs" / "default.yaml"
# split: (file, first pair, pairs). "ncdev"/"nctest": the News Commentary held-out splits (data/nc/, in domain);
# "dev"/"dev2": newstest dev pairs 0-99 / 100-199; "test": the shipped WMT22 test pairs 0-99 (out of domain).
SPLITS = {"dev": ("wmt22/dev.jsonl", 0, 100), "dev2": ("wmt22/dev.jsonl", 100, 100), "test": ("wmt22/test.jsonl", 0, 100),
          "ncdev": ("nc/dev.jsonl", 0, 200), "ncdev100": ("nc/dev.jsonl", 0, 100), "nctest": ("nc/test.jsonl", 0, 200)}


def split_pairs(split: str) -> list[Pair]:
    name, offset, n = SPLITS[split]
    pairs = load_pairs(ROOT / "data" / name, limit=offset + n)[offset:]
    return [Pair(index=i, source=p.source, target=p.target) for i, p in enumerate(pairs)]


def build(args) -> None:
    """The memories of the lever study (train, dev, dev2) and the head, by the build stage on the inline executor."""
    from pema.executors.inline import InlineExecutor
    from pema.stages.build import build_memories, export_head_bundle

    cfg, out = load_config(CONFIG), Path(args.out)
    jobs = {out / "memory" / "dev": split_pairs("ncdev"),
            out / "memory" / "train": load_pairs(ROOT / "data" / "nc" / "train.jsonl", limit=args.train_pairs)}
    manifests = build_memories(cfg, jobs, InlineExecutor())
    for folder, manifest in zip(jobs, manifests):
        print(f"{folder.name}: {manifest.total_rows} rows", flush=True)
    export_head_bundle(cfg, out / "head", InlineExecutor(), tokenizer_hash=manifests[-1].tokenizer_hash)


@torch.no_grad()
def diagnostics(adapter, head, mem: ResidentMemory, stop: int) -> dict:
    """Teacher-forced dev figures: CE of P_LM, P_PEMA and the mixture per lam, top-1, and the stop decision."""
    adapter.eval()
    lm, pema, ys = [], [], []
    for b in mem.batches(4096, shuffle=False):
        k = b["key"].float()
        lm.append(torch.log_softmax(head.from_key(k), -1))
        pema.append(adapter.log_probs(k, head))
        ys.append(b["token"])
    L, P, y = torch.cat(lm), torch.cat(pema), torch.cat(ys)
    g_lm, g_pe = L.gather(1, y[:, None])[:, 0], P.gather(1, y[:, None])[:, 0]
    out = {"lm_ce": -g_lm.mean().item(), "pema_ce": -g_pe.mean().item(),
           "lm_top1": (L.argmax(1) == y).float().mean().item(), "pema_top1": (P.argmax(1) == y).float().mean().item()}
    for lam in (0.3, 0.5, 0.7, 0.9):
        out[f"mix_ce_{lam}"] = -torch.logaddexp(g_lm + math.log(1 - lam), g_pe + math.log(lam)).mean().item()
        mixed = torch.logaddexp(L + math.log(1 - lam), P + math.log(lam))
        out[f"mix_top1_{lam}"] = (mixed.argmax(1) == y).float().mean().item()
    s = y == stop
    for name, D in (("lm", L), ("pema", P)):
        out[f"p_stop_on_stop_{name}"] = D[s, stop].exp().mean().item()
        out[f"stop_recall_{name}"] = ((D.argmax(1) == stop) & s).sum().item() / max(1, int(s.sum()))
        out[f"stop_false_{name}"] = int(((D.argmax(1) == stop) & ~s).sum())
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def train(args) -> None:
    cfg, out = load_config(CONFIG, args.overrides), Path(args.out)
    head, head_meta = load_head(out / "head")
    reader = MemoryReader(out / "memory" / "train")
    mem = ResidentMemory.from_reader(reader, "cpu", torch.float32)
    keep = torch.as_tensor(reader.read_all()["example"]) < args.pairs  # the first P pairs' rows
    mem = ResidentMemory(mem.key[keep].contiguous(), mem.token[keep].contiguous())
    dev = ResidentMemory.from_reader(MemoryReader(out / "memory" / "dev"), "cpu", torch.float32)
    t, a = cfg.train, cfg.adapter
    if t.distill_beta > 0:  # the stored neighbours (computed once per memory), as the train stage does
        from pema.stages.neighbours import distill_targets, ensure_neighbours

        if not bool(keep.all()):
            raise SystemExit("--pairs must cover the whole memory with train.distill_beta > 0")
        ensure_neighbours(cfg, out / "memory" / "train")
        mem = mem.with_extra(**distill_targets(cfg, out / "memory" / "train", 0, len(mem), torch.device("cpu")))
    torch.manual_seed(t.seed)
    adapter = PemaAdapter(head.d, a.rank, a.alpha, a.dropout, a.mlp_hidden)
    start = time.perf_counter()
    results = run_phases(adapter, head, t, train_batches=lambda e: mem.batches(t.batch_size, seed=t.seed * 1000 + e),
                         train_rows=len(mem), dev_batches=lambda: dev.batches(4096, shuffle=False), progress=False)
    seconds = time.perf_counter() - start
    save_adapter(adapter, out / "adapters" / args.name, {
        "model_id": head_meta["model_id"], "config": {"rank": a.rank, "alpha": a.alpha, "dropout": a.dropout,
                                                     "mlp_hidden": a.mlp_hidden},
        "target_source_ratio": reader.manifest.target_source_ratio})
    row = {"name": args.name, "pairs": args.pairs, "rows": len(mem), "overrides": args.overrides,
           "train_s": round(seconds, 1), "phases": [{"phase": r.phase, "best_val": r.best_val, "steps": r.steps}
                                                    for r in results],
           "dev": diagnostics(adapter, head, dev, reader.manifest.extra["stop_token_id"])}
    print(json.dumps(row), flush=True)
    with open(out / "train_results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


@torch.no_grad()
def knn_dev(args) -> None:
    """Teacher-forced kNN-LM on the dev memory (queries: dev keys; memory: the train memory): the CE of
    (1 - lam) P_LM + lam p_kNN, and with ``--adapter`` of the three-way mixture at each (lam, share)."""
    from pema.baselines.knn_index import load_knn

    cfg, out = load_config(CONFIG, args.overrides), Path(args.out)
    head, head_meta = load_head(out / "head")
    knn = load_knn(out / "memory" / "train", cfg.knn, head.vocab_size)
    dev = ResidentMemory.from_reader(MemoryReader(out / "memory" / "dev"), "cpu", torch.float32)
    adapter = load_adapter(out / "adapters" / args.adapter, head_meta)[0] if args.adapter else None
    g_lm, g_knn, g_pe = [], [], []
    for b in dev.batches(2048, shuffle=False):
        k, y = b["key"].float(), b["token"][:, None]
        g_lm.append(torch.log_softmax(head.from_key(k), -1).gather(1, y)[:, 0])
        g_knn.append(knn(k).gather(1, y)[:, 0])
        if adapter is not None:
            g_pe.append(adapter.log_probs(k, head).gather(1, y)[:, 0])
    lm, kn = torch.cat(g_lm), torch.cat(g_knn)
    row = {"k": cfg.knn.k, "temperature": cfg.knn.temperature, "lm_ce": -lm.mean().item()}
    for lam in (0.1, 0.2, 0.3, 0.4, 0.5):
        row[f"knn_mix_ce_{lam}"] = -torch.logaddexp(lm + math.log(1 - lam), kn + math.log(lam)).mean().item()
    if adapter is not None:
        pe = torch.cat(g_pe)
        for lam in (0.5, 0.7, 0.9):
            for share in (0.0, 0.2, 0.4, 0.6):
                other = torch.logaddexp(pe + math.log(1 - share), kn + math.log(share)) if share else pe
                row[f"pema_knn_ce_{lam}_{share}"] = -torch.logaddexp(lm + math.log(1 - lam),
                                                                    other + math.log(lam)).mean().item()
    row = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
    print(json.dumps({"adapter": args.adapter, **row}), flush=True)


def decode(args) -> None:
    from pema.baselines.knn_index import load_knn
    from pema.owner.plm import load_plm
    from pema.stages.decode import translate

    out, specs = Path(args.out), json.loads(Path(args.specs).read_text())
    base = load_config(CONFIG)
    model, tok = load_plm(base.model.model_id, dtype="float32", device="cpu")
    head, head_meta = load_head(out / "head")
    ratio = MemoryReader(out / "memory" / "train").manifest.target_source_ratio
    cache: dict = {}
    for spec in specs:
        pairs = split_pairs(spec.get("split", "dev"))
        cfg = load_config(CONFIG, [f"decode.{k}={json.dumps(v)}" for k, v in spec.get("decode", {}).items()])
        kw: dict = {"ratio": ratio}
        if spec.get("adapter"):
            if spec["adapter"] not in cache:
                cache[spec["adapter"]] = load_adapter(out / "adapters" / spec["adapter"], head_meta)[0]
            kw.update(adapter=cache[spec["adapter"]], head=head, schedule=ScheduleConfig(**spec["schedule"]))
            if spec.get("pema_temp"):  # P_PEMA sharpened (< 1) or flattened (> 1) before mixing
                ad, tau = kw.pop("adapter"), float(spec["pema_temp"])
                kw.pop("head")
                kw["scorer"] = lambda key, ad=ad, tau=tau: torch.log_softmax(ad.logits(key, head) / tau, -1)
            if spec.get("pema_topk"):  # P_PEMA kept on its top-k tokens only (renormalized): a sparse re-ranker
                ad, topk = kw.pop("adapter"), int(spec["pema_topk"])
                kw.pop("head")

                def sparse(key, ad=ad, topk=topk):
                    logits = ad.logits(key, head)
                    kth = logits.topk(topk, dim=-1).values[:, -1:]
                    return torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
                kw["scorer"] = sparse
            if spec.get("knn_share"):  # the three-way mixture: P_kNN takes knn_share of the non-LM weight
                from pema.stages.compare import blended_scorer

                cache.setdefault("knn", load_knn(out / "memory" / "train", cfg.knn, head.vocab_size))
                kw["scorer"] = blended_scorer(kw.pop("adapter"), kw.pop("head"), cache["knn"], float(spec["knn_share"]))
        elif spec.get("knn"):
            cache.setdefault("knn", load_knn(out / "memory" / "train", cfg.knn, head.vocab_size))
            kw.update(scorer=cache["knn"], schedule=ScheduleConfig(kind="constant", lam=spec.get("knn_lam",
                                                                                               cfg.knn.lam)))
        start = time.perf_counter()
        hyps, _ = translate(model, tok, [p.source for p in pairs], cfg, **kw)
        refs = [p.target for p in pairs]
        s = score(hyps, refs)
        row = {**{k: spec.get(k) for k in ("name", "split", "adapter", "schedule", "decode", "knn_share",
                                          "pema_temp", "knn_lam", "pema_topk")},
               **{k: round(s[k], 2) for k in ("bleu", "chrf", "ter")},
               "hyp_ref_chars": round(sum(map(len, hyps)) / sum(map(len, refs)), 3),
               "secs": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)
        with open(out / "decode_results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        (out / "preds").mkdir(exist_ok=True)
        (out / "preds" / f"{spec['name']}_{row['split']}.json").write_text(
            json.dumps({"hyps": hyps, "refs": refs}, ensure_ascii=False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--train-pairs", type=int, default=1200)
    t = sub.add_parser("train")
    t.add_argument("--name", required=True)
    t.add_argument("--pairs", type=int, default=1200)
    t.add_argument("overrides", nargs="*")
    d = sub.add_parser("decode")
    d.add_argument("--specs", required=True)
    k = sub.add_parser("knn")
    k.add_argument("--adapter")
    k.add_argument("overrides", nargs="*")
    for p in (b, t, d, k):
        p.add_argument("--out", default="bench_out/levers")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    {"build": build, "train": train, "decode": decode, "knn": knn_dev}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
