"""Benchmark: the PLM owner's service under load, on 127.0.0.1 only, bounded in requests and time.

- scaling: 1, 4 and 16 concurrent decoding clients, each decoding one test source at a time (batch 1, greedy,
  zero-shot, through the session steps, as an interactive data owner would): aggregate generated tokens/s, p50 and
  p95 step latency, errors; and the service's own count of forwards against steps (how many steps shared one).
- flood: tenant A's one client while tenant F floods (``--flood`` threads opening sessions and stepping them as
  fast as they are answered): A's tokens/s and step latency against A alone, and F's answers by status.

Every client is a thread of this process with its own ``OwnerClient`` (its own connections); the owner's head is
fetched once and shared (each real client holds its own copy). Each level runs ``--seconds`` (a sentence under way
finishes) and at most ``--sentences`` per client.

Where the clients compute the PLM's logits from their keys (a 576 x 49,152 product per token, 14 ms on one core
here): ``--client-head own`` (each client alone, as 16 data owners sharing the owner's host would) or ``shared``
(the default: the clients' products of one moment run as one product, as 16 data owners each on their own machine
would take no time from one another; the service does exactly the same work either way).

    python bench/owner_load.py --seconds 40        # CPU, SmolLM2-135M-Instruct (jobs/configs/default.yaml)

Prints progress to stderr and ONE JSON object as the last line of stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENS = {"acme": "t-bench-acme-0123456789", "flood": "t-bench-flood-0123456789"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class TimedClient:
    """An ``OwnerClient`` that records the latency of every step and open."""

    def __init__(self, client):
        self.client, self.latencies, self.errors = client, [], 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def _timed(self, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        except Exception:
            self.errors += 1
            raise
        finally:
            self.latencies.append(time.perf_counter() - start)

    def open_session(self, prompts, dtype="float32"):
        return self._timed(self.client.open_session, prompts, dtype)

    def step(self, session, tokens, rows=None):
        return self._timed(self.client.step, session, tokens, rows)


class SharedHead:
    """``from_key`` of the owner's head for many client threads at once: the keys waiting when a product starts
    go into it together (the clients' own compute, taken off the two cores the service runs on)."""

    def __init__(self, head):
        self.head, self.lock, self.waiting = head, threading.Lock(), []
        self.cond = threading.Condition()

    def from_key(self, key):
        import torch

        slot = {"key": key, "out": None}
        with self.cond:
            self.waiting.append(slot)
        with self.lock:
            if slot["out"] is None:
                with self.cond:
                    batch, self.waiting = self.waiting, []
                with torch.no_grad():
                    out = self.head.from_key(torch.cat([b["key"] for b in batch]))
                row = 0
                for b in batch:
                    b["out"], row = out[row:row + len(b["key"])], row + len(b["key"])
        return slot["out"]


def percentile(values, q):
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def decode_loop(url, token, prompts, plm_head, stop, pad, settings, deadline, limit, out):
    """One client: sentences one at a time until ``deadline`` or ``limit``; appends its figures to ``out``."""
    from pema.adapter.remote import OwnerClient
    from pema.adapter.remote_decode import generate_remote

    client = TimedClient(OwnerClient(url, token, timeout_s=600))
    tokens = sentences = 0
    try:
        for prompt in prompts[:limit]:
            if time.perf_counter() >= deadline:
                break
            result = generate_remote(client, [prompt], stop_token_id=stop, pad_token_id=pad, settings=settings,
                                     progress=False, plm_head=plm_head)
            tokens, sentences = tokens + result.generated_tokens, sentences + 1
    except Exception as exc:  # counted, and the client stops
        log(f"client error: {exc}")
    out.append({"tokens": tokens, "sentences": sentences, "latencies": client.latencies, "errors": client.errors,
                "bytes": client.bytes_in + client.bytes_out})


def run_level(url, n, prompts, plm_head, stop, pad, settings, seconds, limit, token=TOKENS["acme"]):
    out: list[dict] = []
    start = time.perf_counter()
    threads = [threading.Thread(target=decode_loop, args=(url, token, prompts[i::n] if n > 1 else prompts, plm_head,
                                                          stop, pad, settings, start + seconds, limit, out))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies = [x for o in out for x in o["latencies"]]
    tokens = sum(o["tokens"] for o in out)
    return {"clients": n, "seconds": round(wall, 2), "tokens": tokens, "tokens_per_s": tokens / wall,
            "sentences": sum(o["sentences"] for o in out), "p50_step_ms": percentile(latencies, 50) * 1000,
            "p95_step_ms": percentile(latencies, 95) * 1000, "errors": sum(o["errors"] for o in out),
            "bytes_per_token": sum(o["bytes"] for o in out) / max(1, tokens)}


def flood(url, prompt, stop_at, answers):
    """Open a session and step it as fast as the service answers, reopening when refused or done."""
    from pema.adapter.remote import OwnerClient
    from pema.errors import OwnerRequestError

    client = OwnerClient(url, TOKENS["flood"], timeout_s=600)
    while time.perf_counter() < stop_at:
        try:
            session, _ = client.open_session([prompt] * 8)
            answers["200"] = answers.get("200", 0) + 1
            for _ in range(64):
                if time.perf_counter() >= stop_at:
                    break
                client.step(session, [5] * 8)
                answers["200"] = answers.get("200", 0) + 1
            client.close(session)
        except OwnerRequestError as exc:
            answers[str(exc.status)] = answers.get(str(exc.status), 0) + 1
            time.sleep(0.001)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "jobs/configs/default.yaml"))
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--sentences", type=int, default=200, help="at most this many sentences per client and level")
    p.add_argument("--flood", type=int, default=8, help="flooding threads of tenant F (0: no flood run)")
    p.add_argument("--port", type=int, default=8124)
    p.add_argument("--replica-cpus", type=float, default=float(os.cpu_count()),
                   help="the replica's num_cpus (Ray sets its torch threads from it); default: this machine's")
    p.add_argument("--client-head", choices=("shared", "own"), default="shared",
                   help="how the clients' logits products run (see the module docstring)")
    args = p.parse_args(argv)

    import torch

    from pema.adapter.decode import GenerationSettings
    from pema.adapter.remote import OwnerClient
    from pema.config import load_config, with_absolute_data
    from pema.executors.ray_runtime import init_ray
    from pema.executors.ray_serve import start_owner
    from pema.formats.tasks import (load_pairs, resolve_template, source_prompt_ids, stop_token_id,
                                    use_chat_template)

    torch.set_num_threads(1)  # the clients' head products, one core's worth; the replica has its own
    cfg = with_absolute_data(load_config(args.config))
    tmp = Path(tempfile.mkdtemp(prefix="bench_load_"))
    (tmp / "tokens.json").write_text(json.dumps(TOKENS))
    init_ray(quiet=True)
    log("starting the owner's service on Ray Serve ...")
    url = start_owner(cfg.model.model_id, port=args.port, dtype=cfg.model.dtype, tokens_file=str(tmp / "tokens.json"),
                      audit_path=str(tmp / "audit.jsonl"),
                      options={"ray_actor_options": {"num_cpus": args.replica_cpus}})
    probe = OwnerClient(url, TOKENS["acme"], timeout_s=600)
    tokenizer, plm_head = probe.tokenizer(), probe.output_head()
    if args.client_head == "shared":
        plm_head = SharedHead(plm_head)
    chat = use_chat_template(tokenizer, cfg.model.prompt_format)
    template = resolve_template(cfg.data.template)
    prompts = [source_prompt_ids(tokenizer, template, x.source, source_field=cfg.data.source_field, chat=chat)
               for x in load_pairs(cfg.data.test)]
    stop = stop_token_id(tokenizer, chat=chat)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop
    settings = GenerationSettings(max_new_tokens=cfg.decode.max_new_tokens, batch_size=1)
    out = {"machine": f"{os.cpu_count()} CPUs", "model": cfg.model.model_id, "max_new_tokens": settings.max_new_tokens,
           "client_head": args.client_head, "replica_cpus": args.replica_cpus,
           "seconds_per_level": args.seconds, "levels": []}
    run_level(url, 1, prompts[:2], plm_head, stop, pad, settings, 60, 2)  # warm-up
    for n in [int(x) for x in args.levels.split(",")]:
        before = probe.health()
        row = run_level(url, n, prompts, plm_head, stop, pad, settings, args.seconds, args.sentences)
        after = probe.health()
        row["forwards"], row["steps"] = after["forwards"] - before["forwards"], after["steps"] - before["steps"]
        log(f"{n} clients: {row}")
        out["levels"].append(row)
    one = next((r for r in out["levels"] if r["clients"] == 1), None)
    if one:
        out["speedup"] = {str(r["clients"]): r["tokens_per_s"] / one["tokens_per_s"] for r in out["levels"]}
    if args.flood:
        answers: dict[str, int] = {}
        stop_at = time.perf_counter() + args.seconds + 5
        flooders = [threading.Thread(target=flood, args=(url, prompts[0], stop_at, answers))
                    for _ in range(args.flood)]
        for t in flooders:
            t.start()
        time.sleep(2)
        row = run_level(url, 1, prompts, plm_head, stop, pad, settings, args.seconds, args.sentences)
        for t in flooders:
            t.join()
        out["flood"] = {"tenant_a": row, "flooder_threads": args.flood, "flooder_answers": answers}
        if one:
            out["flood"]["a_tokens_per_s_vs_alone"] = row["tokens_per_s"] / one["tokens_per_s"]
        log(f"flood: {out['flood']}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
