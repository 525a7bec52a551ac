"""LoRA reference baseline (PEFT): fine-tune the PLM's own weights on the same pairs PEMA's memory is built from.

This is what a PLM owner could offer instead of PEMA (it needs the full weights, so it lives on the owner's side).
Each example is ``prompt + target`` tokenized by :func:`pema.owner.build.prepare_examples`, the memory builder's own
tokenization (target = target text + stop token); labels are -100 on the prompt, so the loss is the mean
cross-entropy over the target tokens of a batch, position ``P - 1 + t`` predicting target token ``t`` exactly as a
memory key does. Optimisation follows the Hugging Face Trainer's defaults where the config is silent: AdamW on the
adapter parameters only, weight decay 0, gradient-norm clip 1.0, constant learning rate, no warmup.

:func:`train_lora` modifies ``model`` in place (PEFT injects the LoRA layers and freezes the base weights); the
returned PeftModel decodes through ``pema.stages.decode.translate`` as it is (no merge needed).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from pema.config import PipelineConfig
from pema.owner.build import prepare_examples
from pema.profiling import PeakMemory
from pema.formats.tasks import Pair, resolve_template, stop_token_id, use_chat_template

IGNORE = -100  # label of positions that carry no loss (the prompt, the padding)
_LORA_LAYERS = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv1D")  # layer types PEFT's LoRA can wrap


@dataclass
class LoraResult:
    model: nn.Module  # the trained PeftModel, in eval mode
    losses: list[float]  # per optimizer step
    epoch_losses: list[float]  # mean over each epoch's steps
    train_seconds: float
    peak_bytes: int  # training's peak on top of the loaded model; see memory_kind and pema.profiling
    memory_kind: str  # cuda_allocated | cpu_rss
    trainable_params: int
    total_params: int
    tokens_per_s: float  # target (labelled) tokens per second, the unit of PEMA's memory entries/s
    meta: dict = field(default_factory=dict)

    def merged(self) -> nn.Module:
        """The base model with the adapter merged into its weights (PEFT ``merge_and_unload``). It consumes the
        PeftModel: ``self.model`` must not be used afterwards. Decoding does not need it."""
        return self.model.merge_and_unload()


def lora_examples(tokenizer, pairs: Sequence[Pair], cfg: PipelineConfig) -> list[tuple[list[int], list[int]]]:
    """``[(input_ids, labels), ...]``, both of length P + T: ``prompt + target`` and ``[-100] * P + target``."""
    if not pairs:
        raise ValueError("pairs is empty: LoRA needs at least one training pair (check data.train / train_limit)")
    chat = use_chat_template(tokenizer, cfg.model.prompt_format)
    examples, _ = prepare_examples(tokenizer, pairs, template=resolve_template(cfg.data.template),
                                   source_field=cfg.data.source_field, chat=chat)
    return [(list(e.prompt_ids) + list(e.target_ids), [IGNORE] * len(e.prompt_ids) + list(e.target_ids))
            for e in examples]


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels``, each (batch, max length)."""
    width = max(len(ids) for ids, _ in examples)
    out = {"input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
           "labels": torch.full((len(examples), width), IGNORE, dtype=torch.long)}
    for row, (ids, labels) in enumerate(examples):
        out["input_ids"][row, : len(ids)] = torch.as_tensor(ids)
        out["attention_mask"][row, : len(ids)] = 1
        out["labels"][row, : len(labels)] = torch.as_tensor(labels)
    return out


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]):
    """The model's output for a collated batch; ``.loss`` is the mean CE over the labelled tokens."""
    return model(**batch, use_cache=False)


def check_target_modules(model: nn.Module, target_modules: Sequence[str]) -> None:
    """ValueError naming every target that matches no module (PEFT's rule: the name or its dotted suffix)."""
    if tuple(target_modules) == ("all-linear",):
        return
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        layers = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if n and type(m).__name__ in _LORA_LAYERS})
        raise ValueError(f"lora.target_modules {missing} match no module of {type(model).__name__}; "
                         f"its layers LoRA can wrap are {layers} (or use ['all-linear'])")


def train_lora(model: nn.Module, tokenizer, pairs: Sequence[Pair], cfg: PipelineConfig, *, progress: bool = True,
               report: Callable[[dict], None] | None = None) -> LoraResult:
    """Wrap ``model`` with LoRA (``cfg.lora``), train it on ``pairs`` and return the PeftModel with its costs."""
    import peft

    lc = cfg.lora
    if isinstance(model, peft.PeftModel):
        raise ValueError("model is already a PeftModel; pass the base model (a fresh load_plm) to train_lora")
    data = lora_examples(tokenizer, pairs, cfg)
    check_target_modules(model, lc.target_modules)
    if getattr(model, "hf_device_map", None) is None:
        model.to(cfg.resources.device)
    device = next(model.parameters()).device
    chat = use_chat_template(tokenizer, cfg.model.prompt_format)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_id(tokenizer, chat=chat)
    targets = list(lc.target_modules) if tuple(lc.target_modules) != ("all-linear",) else "all-linear"
    torch.manual_seed(lc.seed)  # LoRA's A initialisation and dropout
    gen = torch.Generator().manual_seed(lc.seed)  # the shuffling
    steps_per_epoch = math.ceil(len(data) / lc.batch_size)
    losses: list[float] = []
    labelled = 0
    with PeakMemory(device) as meter:
        start = time.perf_counter()
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets, task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lc.lr, weight_decay=0.0)
        model.train()
        bar = tqdm(total=lc.epochs * steps_per_epoch, desc="lora", unit="step", disable=not progress, leave=False)
        for epoch in range(lc.epochs):
            order = torch.randperm(len(data), generator=gen).tolist()
            for b in range(0, len(order), lc.batch_size):
                batch = {k: v.to(device) for k, v in collate([data[i] for i in order[b: b + lc.batch_size]],
                                                             pad).items()}
                loss = batch_loss(model, batch).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(float(loss.detach()))
                labelled += int((batch["labels"] != IGNORE).sum())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if report is not None:
                    report({"epoch": epoch, "step": len(losses), "loss": losses[-1]})
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    model.eval()
    trainable, total = model.get_nb_trainable_parameters()
    epoch_losses = [sum(losses[i: i + steps_per_epoch]) / len(losses[i: i + steps_per_epoch])
                    for i in range(0, len(losses), steps_per_epoch)]
    return LoraResult(model, losses, epoch_losses, seconds, int(meter.peak_bytes), meter.kind, int(trainable),
                      int(total), labelled / seconds if seconds > 0 else 0.0,
                      meta={"examples": len(data), "target_tokens_per_epoch": labelled // lc.epochs,
                            "device": str(device), "steps": len(losses)})


def save_lora(result: LoraResult, out_dir) -> Path:
    """Write the adapter (``adapter_model.safetensors`` + ``adapter_config.json``, never a pickle) and
    ``lora_result.json`` (losses, time, memory, parameter counts) into ``out_dir``."""
    out = Path(out_dir)
    result.model.save_pretrained(str(out), safe_serialization=True)
    stats = {k: v for k, v in vars(result).items() if k != "model"}
    (out / "lora_result.json").write_text(json.dumps(stats, indent=1))
    return out


def load_lora(model: nn.Module, out_dir) -> nn.Module:
    """Wrap a fresh base ``model`` with the adapter saved by :func:`save_lora`; returns the PeftModel in eval mode."""
    import peft

    out = Path(out_dir)
    if not (out / "adapter_model.safetensors").is_file() or not (out / "adapter_config.json").is_file():
        raise ValueError(f"{out} holds no adapter_model.safetensors + adapter_config.json; "
                         "point it at a folder written by save_lora (pickled adapters are not loaded)")
    return peft.PeftModel.from_pretrained(model, str(out), is_trainable=False).eval()
