"""The baselines' config sections: kNN-LM over the memory (``knn``) and LoRA on the PLM's weights (``lora``)."""
from __future__ import annotations

from dataclasses import dataclass

from pema.config_fields import _check, _choice, _is_int, _is_num

@dataclass(frozen=True)
class KnnConfig:
    """kNN-LM baseline over the same external memory: p_kNN from the k nearest keys, mixed with P_LM by ``lam``."""
    k: int = 16
    temperature: float = 1.0  # p_kNN(y) ~ sum over neighbours with token y of exp(-distance / temperature)
    lam: float = 0.25  # constant interpolation weight of p_kNN (kNN-LM's lambda)
    index: str = "auto"  # exact (torch, every key) | ivfpq (FAISS) | auto: exact up to exact_max_rows
    exact_max_rows: int = 2_000_000
    nlist: int = 1024  # IVF cells (capped by the memory size / 39 so that training has enough points)
    nprobe: int = 32
    pq_m: int = 32  # PQ sub-quantizers; must divide d (the nearest divisor of d is used otherwise)
    pema_share: float = 0.5  # pema_knn: p_kNN's share of the non-LM weight decode.pema_knn (the rest is P_PEMA's)

    def __post_init__(self):
        _check(_is_int(self.k) and self.k >= 1, "knn.k", self.k, "an integer >= 1")
        _check(_is_num(self.temperature) and self.temperature > 0, "knn.temperature", self.temperature, "> 0")
        _check(_is_num(self.lam) and 0.0 <= self.lam <= 1.0, "knn.lam", self.lam, "a number in [0, 1]")
        _choice("knn.index", self.index, ("auto", "exact", "ivfpq"))
        _check(_is_num(self.pema_share) and 0.0 <= self.pema_share <= 1.0, "knn.pema_share", self.pema_share,
               "a number in [0, 1]")
        for name in ("exact_max_rows", "nlist", "nprobe", "pq_m"):
            _check(_is_int(v := getattr(self, name)) and v >= 1, f"knn.{name}", v, "an integer >= 1")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA reference (PEFT) on the PLM's own weights: what a PLM owner could offer instead of PEMA."""
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    epochs: int = 2
    lr: float = 2e-4
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        _check(_is_int(self.rank) and self.rank >= 1, "lora.rank", self.rank, "an integer >= 1")
        _check(_is_num(self.alpha) and self.alpha > 0, "lora.alpha", self.alpha, "> 0")
        _check(_is_num(self.dropout) and 0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "in [0, 1)")
        _check(isinstance(self.target_modules, tuple) and len(self.target_modules) > 0 and
               all(isinstance(m, str) and m for m in self.target_modules),
               "lora.target_modules", self.target_modules, "a non-empty list of module names")
        _check(_is_int(self.epochs) and self.epochs >= 1, "lora.epochs", self.epochs, "an integer >= 1")
        _check(_is_num(self.lr) and self.lr > 0, "lora.lr", self.lr, "> 0")
        _check(_is_int(self.batch_size) and self.batch_size >= 1, "lora.batch_size", self.batch_size, "an integer >= 1")
        _check(_is_int(self.seed), "lora.seed", self.seed, "an integer")
