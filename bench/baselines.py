"""Benchmark: what adapting costs with PEMA against the LoRA reference, and kNN-LM's search, in one process.

- lora: PEFT LoRA (r 16 on q_proj and v_proj, as ``jobs/configs/default.yaml``) on a randomly initialised PLM of a
  real shape, the way :func:`pema.owner.lora.train_lora` trains it: the whole PLM in memory (bfloat16 on a GPU),
  prompt + target sequences with the loss on the target half (``batch_loss``), AdamW on the LoRA weights only.
  Reported per TARGET token, the unit a memory entry is.
- pema: the data owner's RCT_PD step on the same d and vocabulary (``bench/train.py``'s project path: the memory
  resident on the device, the frozen output head, AdamW on A and B_pd). The PLM is not needed at all.
- knn: kNN-LM's exact search (``pema.baselines.knn.ExactIndex``: chunked top-k over the memory, float16 keys on a
  GPU) for one decoding step of a batch, against a naive search (``torch.cdist`` over the whole float32 memory,
  then ``topk``).

Peak memory: CUDA ``max_memory_allocated`` of the path from its start (absolute: LoRA's includes the PLM's
weights, which is the point of the comparison); CPU: peak RSS above the path's start.

    python bench/baselines.py --gpu    # OPT-1.3B shapes: d 2048, 24 layers, vocab 50272
    python bench/baselines.py          # CPU: SmolLM2-135M shapes (d 576, 30 layers, vocab 49152), few steps

Prints progress to stderr and ONE JSON object as the last line of stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import torch  # noqa: E402

from common import PeakMemory, device_name, emit, free_device_memory, log, pick_device, rate, timed_steps  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--seq", type=int, default=128, help="LoRA: tokens per sequence (half prompt, half target)")
    p.add_argument("--lora-batch", type=int, default=None, help="LoRA sequences per step (default 2 CPU, 16 GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per path (default 3 CPU, 30 GPU)")
    p.add_argument("--knn-rows", type=int, default=None, help="memory rows searched (default 100k CPU, 1M GPU)")
    p.add_argument("--knn-queries", type=int, default=16, help="rows searched per decoding step (the batch)")
    p.add_argument("--k", type=int, default=16)
    return p.parse_args(argv)


def plm(gpu: bool):
    """A random PLM of a real shape: OPT-1.3B on a GPU, SmolLM2-135M (Llama) on a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    if gpu:
        cfg = OPTConfig(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                        vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048)
        with torch.device("cuda"):
            return OPTForCausalLM(cfg).to(torch.bfloat16), "opt-1.3b shapes", "layer"
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg), "smollm2-135m shapes", "rms"


def lora_path(args, device) -> dict:
    from peft import LoraConfig, get_peft_model

    from pema.owner.lora import IGNORE, batch_loss

    with PeakMemory(device) as peak:
        model, shape, norm = plm(device.type == "cuda")
        d, vocab = model.config.hidden_size, model.config.vocab_size
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:  # LoRA weights in float32 over a bfloat16 base, as mixed-precision LoRA is run
            p.data = p.data.float()
        opt = torch.optim.AdamW(trainable, lr=2e-4)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (args.lora_batch, args.seq), generator=g).to(device)
        labels = ids.clone()
        labels[:, : args.seq // 2] = IGNORE
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        targets = args.lora_batch * (args.seq - args.seq // 2)

        def step() -> int:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = batch_loss(model, batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            loss.item()
            return targets

        rows, seconds = timed_steps(step, warmup=1, steps=args.steps, device=device)
    out = {"shape": shape, "norm": norm, "d": d, "vocab": vocab, "target_tokens_per_s": rate(rows, seconds),
           "peak_mem_mb": peak.peak_mb, "trainable_params": sum(p.numel() for p in trainable),
           "total_params": sum(p.numel() for p in model.parameters())}
    log(f"lora: {out['target_tokens_per_s']:,.0f} target tokens/s, peak {peak.peak_mb:,.0f} MiB, "
        f"{out['trainable_params']:,} trainable of {out['total_params']:,}")
    del model, opt, batch
    free_device_memory(device)
    return out


def pema_path(args, lora: dict, device) -> dict:
    import train as train_bench

    gpu = device.type == "cuda"
    targs = train_bench.parse_args(["--gpu"] if gpu else [])
    targs.d, targs.vocab, targs.norm = lora["d"], lora["vocab"], lora["norm"]
    targs.rows = targs.rows or (131072 if gpu else 4096)
    targs.batch_size = targs.batch_size or (4096 if gpu else 256)
    targs.steps = args.steps * (5 if gpu else 4)
    targs.via_parquet = False
    keys, tokens = train_bench.random_memory(targs.rows, targs.d, targs.vocab, 0)
    with tempfile.TemporaryDirectory() as tmp:
        out = train_bench.project_path(targs, "bf16h" if gpu else "fp32", keys, tokens, device, tmp)
    out["trainable_params"] = 2 * targs.rank * targs.d  # A and B_pd (B_rct is frozen in RCT_PD)
    return out


def knn_path(args, d: int, device) -> dict:
    from pema.baselines.knn import ExactIndex

    g = torch.Generator().manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    keys = torch.randn(args.knn_rows, d, generator=g).to(device=device, dtype=dtype)
    query = torch.randn(args.knn_queries, d, generator=g).to(device)
    index = ExactIndex(keys)
    calls = max(3, args.steps)
    _, project_s = timed_steps(lambda: index.search(query, args.k) and 1, warmup=1, steps=calls, device=device)
    full = keys.float()

    def naive() -> int:
        torch.topk(torch.cdist(query, full), args.k, dim=1, largest=False)
        return 1

    _, naive_s = timed_steps(naive, warmup=1, steps=calls, device=device)
    out = {"rows": args.knn_rows, "queries": args.knn_queries, "k": args.k, "ms_per_step": 1000 * project_s / calls,
           "naive_ms_per_step": 1000 * naive_s / calls, "keys_dtype": str(dtype).replace("torch.", "")}
    log(f"knn: {out['ms_per_step']:.2f} ms per step over {args.knn_rows:,} keys ({out['keys_dtype']}); naive "
        f"cdist {out['naive_ms_per_step']:.2f} ms")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.gpu)
    gpu = device.type == "cuda"
    args.lora_batch = args.lora_batch or (16 if gpu else 2)
    args.steps = args.steps or (30 if gpu else 3)
    args.knn_rows = args.knn_rows or (1_000_000 if gpu else 100_000)
    torch.manual_seed(0)
    lora = lora_path(args, device)
    pema = pema_path(args, lora, device)
    knn = knn_path(args, lora["d"], device)
    result = {"device": device_name(device), "lora": lora, "pema": pema, "knn": knn,
              "pema_over_lora_tokens_per_s": pema["entries_per_s"] / lora["target_tokens_per_s"],
              "lora_over_pema_peak_mem": lora["peak_mem_mb"] / pema["peak_mem_mb"],
              "knn_speedup_over_naive": knn["naive_ms_per_step"] / knn["ms_per_step"], "time": time.time()}
    emit(result)
    return result


if __name__ == "__main__":
    main()
