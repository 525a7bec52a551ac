"""Benchmark: the PLM owner's service against the in-process owner, in one process run (issue 13's figures).

- decode: greedy decoding of N test sources, zero-shot and PEMA-mixed (decode.pema), in-process (the PLM here,
  ``generate()`` with the PEMA logits processor) and through the service on 127.0.0.1 (Ray Serve, the session
  steps, ``pema.adapter.remote_decode``): seconds and bytes per generated token.
- pema_vs_generate: in-process PEMA decoding against plain ``generate()`` (zero-shot): time per token.
- build: the memory rows of M training pairs, encoded in-process (``MemoryEncoder``, the build stage's body) and
  through ``/context`` (what ``RemoteShardEncoder`` sends), the same length batches: entries per second, the PLM
  already loaded on both sides.

The adapter is ``--adapter`` (default ``outputs/default/adapter``, as ``make run`` leaves it) or a random one.

    python bench/owner_service.py --sources 20 --pairs 60      # CPU, SmolLM2-135M-Instruct (jobs/configs/default.yaml)

Prints progress to stderr and ONE JSON object as the last line of stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "jobs/configs/default.yaml"))
    p.add_argument("--sources", type=int, default=20)
    p.add_argument("--pairs", type=int, default=60)
    p.add_argument("--adapter", default=str(ROOT / "outputs/default/adapter"))
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--replica-cpus", type=float, default=float(os.cpu_count()),
                   help="the replica's num_cpus (its torch threads), as serve/owner.yaml gives it; default: this "
                        "machine's, as many as the in-process side uses")
    args = p.parse_args(argv)

    import torch

    from pema.adapter.io import load_adapter, load_head
    from pema.adapter.model import PemaAdapter
    from pema.adapter.remote import OwnerClient
    from pema.config import load_config, with_absolute_data
    from pema.executors.ray_runtime import init_ray
    from pema.executors.ray_serve import start_owner
    from pema.formats.tasks import load_pairs
    from pema.owner.export import export_head
    from pema.owner.plm import load_plm
    from pema.stages.decode import translate

    cfg = with_absolute_data(load_config(args.config))
    sources = [x.source for x in load_pairs(cfg.data.test, limit=args.sources)]
    tmp = Path(tempfile.mkdtemp(prefix="bench_owner_"))
    (tmp / "tokens.json").write_text(json.dumps({"bench": "t-bench-0123456789"}))
    init_ray(quiet=True)
    log("starting the owner's service on Ray Serve ...")
    url = start_owner(cfg.model.model_id, port=args.port, dtype=cfg.model.dtype, tokens_file=str(tmp / "tokens.json"),
                      options={"ray_actor_options": {"num_cpus": args.replica_cpus}})
    client = OwnerClient(url, "t-bench-0123456789", timeout_s=600)
    model, tokenizer = load_plm(cfg.model.model_id, dtype=cfg.model.dtype)
    export_head(model, tmp / "head", model_id=cfg.model.model_id)
    head, head_meta = load_head(tmp / "head")
    if Path(args.adapter, "adapter.json").is_file():
        adapter, meta = load_adapter(args.adapter, head_meta)
        ratio, adapter_from = meta["target_source_ratio"], args.adapter
    else:
        torch.manual_seed(0)
        adapter, ratio, adapter_from = PemaAdapter(head.d, 64, 64.0, 0.0), 1.3, "random (rank 64)"
    adapter.eval()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = {"machine": f"{os.cpu_count()} CPUs", "replica_cpus": args.replica_cpus, "model": cfg.model.model_id,
           "sources": len(sources),
           "max_new_tokens": cfg.decode.max_new_tokens, "batch_size": cfg.decode.batch_size, "adapter": adapter_from}

    def run(name, decoder, **kw):
        translate(decoder, tokenizer, sources[:2], cfg, ratio=ratio, **kw)  # warm-up
        before = (client.bytes_in, client.bytes_out)
        start = time.perf_counter()
        hyps, result = translate(decoder, tokenizer, sources, cfg, ratio=ratio, **kw)
        seconds = time.perf_counter() - start
        crossed = client.bytes_in - before[0] + client.bytes_out - before[1]
        row = {"seconds": round(seconds, 2), "tokens": result.generated_tokens,
               "s_per_token": seconds / result.generated_tokens, "bytes_per_token": crossed / result.generated_tokens}
        log(f"{name}: {row}")
        return row, hyps

    pema_kw = dict(adapter=adapter, head=head, schedule=cfg.decode.pema)
    out["decode"] = {}
    out["decode"]["zero_shot_in_process"], z_local = run("zero_shot in-process", model)
    out["decode"]["zero_shot_service"], z_remote = run("zero_shot service", client)
    out["decode"]["pema_in_process"], p_local = run("pema in-process", model, **pema_kw)
    out["decode"]["pema_service"], p_remote = run("pema service", client, **pema_kw)
    out["decode"]["same_outputs"] = {"zero_shot": z_local == z_remote, "pema": p_local == p_remote}
    d = out["decode"]
    out["ratios"] = {
        "service_vs_in_process_zero_shot": d["zero_shot_service"]["s_per_token"] / d["zero_shot_in_process"]["s_per_token"],
        "service_vs_in_process_pema": d["pema_service"]["s_per_token"] / d["pema_in_process"]["s_per_token"],
        "pema_vs_generate_in_process": d["pema_in_process"]["s_per_token"] / d["zero_shot_in_process"]["s_per_token"],
    }

    from pema.formats.tasks import resolve_template, use_chat_template
    from pema.owner.build import prepare_examples
    from pema.owner.encode import MemoryEncoder, length_batches

    examples, _ = prepare_examples(tokenizer, load_pairs(cfg.data.train, limit=args.pairs),
                                   template=resolve_template(cfg.data.template), source_field=cfg.data.source_field,
                                   chat=use_chat_template(tokenizer, cfg.model.prompt_format))
    batches = length_batches(examples, cfg.memory.batch_tokens)
    encoder = MemoryEncoder(model, pad_id=tokenizer.pad_token_id or 0, key_dtype=cfg.memory.dtype)
    build = {}
    for name, encode in (("in_process", encoder), ("service", lambda b: client.context(b, dtype=cfg.memory.dtype))):
        encode(batches[0])  # warm-up
        start = time.perf_counter()
        rows = sum(len(encode(b)["token"]) for b in batches)
        seconds = time.perf_counter() - start
        build[name] = {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": rows / seconds}
        log(f"build {name}: {build[name]}")
    build["service_vs_in_process"] = build["service"]["rows_per_s"] / build["in_process"]["rows_per_s"]
    out["build"] = build
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
