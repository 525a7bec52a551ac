"""Interpolated generation inside stock ``transformers`` ``generate()`` (greedy, beam search, sampling).

:class:`PemaLogitsProcessor` receives the PLM's next-token scores (its P_LM) and reads the PLM owner's key for the
same step from a ``key_source`` (in-process: a forward hook on the PLM's final norm, see
``pema.owner.respond.ContextTap``), computes log P_PEMA with the adapter and the exported head, and returns the
log-space mixture under the row's lambda. Nothing in transformers is forked or patched. The same path serves any
distribution of the key (:class:`MixtureLogitsProcessor` with a ``scorer``), e.g. the kNN-LM baseline
(``pema.baselines.knn``).

Order inside generate() (transformers 5.x): the PEMA processor runs first, then the sampling warpers
(temperature, top-k, top-p), so they shape the MIXTURE, as a user expects. -inf entries in the PLM's scores
(hard constraints) stay -inf.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from pema.adapter.head import OutputHead
from pema.adapter.model import PemaAdapter
from pema.adapter.schedule import Schedule, interpolate, own_stop
from pema.formats.tasks import OverlengthError, context_window


class KeySource(Protocol):
    """The owner's context response for the latest forward: a context manager with ``last_key() -> (rows, d)``."""

    def __enter__(self): ...
    def __exit__(self, *exc): ...
    def last_key(self) -> torch.Tensor: ...


class MixtureLogitsProcessor(LogitsProcessor):
    """``scores (rows, vocab)`` -> ``log P`` mixed with a second distribution; rows = batch * beams (or return
    sequences).

    ``scorer(key (rows, d) float32) -> log-probs (rows, vocab')`` gives the second distribution from the owner's key
    (PEMA: ``adapter.log_probs(key, head)``; kNN-LM: ``pema.baselines.knn.KnnScorer``). Columns beyond the PLM's
    vocabulary are dropped and missing ones are -inf. ``device``: where the key is sent and the mixture is computed
    (default: the scores' device).
    """

    def __init__(self, scorer: Callable[[torch.Tensor], torch.Tensor], key_source: Callable[[], torch.Tensor],
                 schedule: Schedule, horizons: torch.Tensor, prompt_length: int,
                 device: torch.device | str | None = None, stop_token_id: int | None = None):
        if schedule.stop_lam is not None and stop_token_id is None:
            raise ValueError("a schedule with stop_lam needs the stop_token_id")
        self.scorer, self.key_source, self.device, self.stop_token_id = scorer, key_source, device, stop_token_id
        self.schedule, self.horizons, self.prompt_length = schedule, horizons, prompt_length
        self.lam_trace: list[torch.Tensor] = []  # lam per step, per input row (for plots and tests)

    def lam_for(self, t: int, rows: int) -> torch.Tensor:
        horizons = self.horizons
        if rows != len(horizons):
            if rows % len(horizons):
                raise ValueError(f"{rows} rows cannot be matched to {len(horizons)} horizons")
            horizons = horizons.repeat_interleave(rows // len(horizons))
        return self.schedule(t, horizons)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t = input_ids.shape[1] - self.prompt_length
        lam = self.lam_for(t, input_ids.shape[0])
        self.lam_trace.append(lam[:: max(1, input_ids.shape[0] // len(self.horizons))].clone())
        stop_lam = self.schedule.stop_lam
        if bool((lam == 0).all()) and stop_lam in (None, 0.0):
            return scores  # exactly the PLM's own decoding
        device = scores.device if self.device is None else self.device
        key = self.key_source().to(device=device, dtype=torch.float32)
        log_p_other = self.scorer(key).to(device)
        log_p_lm = torch.log_softmax(scores.float(), dim=-1).to(device)
        vocab = log_p_lm.shape[1]
        if log_p_other.shape[1] < vocab:
            pad = log_p_other.new_full((log_p_other.shape[0], vocab - log_p_other.shape[1]), float("-inf"))
            log_p_other = torch.cat([log_p_other, pad], dim=1)
        log_p_other = log_p_other[:, :vocab]
        mixed = interpolate(log_p_lm, log_p_other, lam.to(device))
        if stop_lam is not None:
            mixed = own_stop(mixed, log_p_lm, log_p_other, self.stop_token_id, stop_lam)  # keeps a banned stop
        return mixed.to(scores.device, scores.dtype)


class LengthCapProcessor(LogitsProcessor):
    """Forces the stop token once a row has generated ``caps[row]`` tokens (rows = batch * beams): a length limit
    per row, known before decoding (e.g. from the source length, :func:`pema.adapter.schedule.length_caps`), for
    every system alike."""

    def __init__(self, caps: torch.Tensor, prompt_length: int, stop_token_id: int):
        self.caps, self.prompt_length, self.stop_token_id = caps.to(torch.long), prompt_length, stop_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t = input_ids.shape[1] - self.prompt_length
        caps = self.caps.to(scores.device)
        if input_ids.shape[0] != len(caps):
            caps = caps.repeat_interleave(input_ids.shape[0] // len(caps))
        over = t >= caps
        if not bool(over.any()):
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.stop_token_id] = 0.0
        return torch.where(over[:, None], forced, scores)


class PemaLogitsProcessor(MixtureLogitsProcessor):
    """The mixture with P_PEMA: ``scorer = adapter.log_probs(key, head)``, computed on the adapter's device."""

    def __init__(self, adapter: PemaAdapter, head: OutputHead, key_source: Callable[[], torch.Tensor],
                 schedule: Schedule, horizons: torch.Tensor, prompt_length: int, stop_token_id: int | None = None):
        super().__init__(lambda key: adapter.log_probs(key, head), key_source, schedule, horizons, prompt_length,
                         device=next(adapter.parameters()).device, stop_token_id=stop_token_id)
        self.adapter, self.head = adapter, head


@dataclass(frozen=True)
class GenerationSettings:
    strategy: str = "greedy"  # greedy | beam | sample
    num_beams: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    batch_size: int = 16
    seed: int = 0
    no_repeat_ngram_size: int = 0  # applied to P_LM before mixing; banned tokens stay banned in the mixture
    repetition_penalty: float = 1.0

    def generate_kwargs(self) -> dict:
        common = {"no_repeat_ngram_size": self.no_repeat_ngram_size, "repetition_penalty": self.repetition_penalty}
        if self.strategy == "greedy":
            return {"do_sample": False, "num_beams": 1, **common}
        if self.strategy == "beam":
            return {"do_sample": False, "num_beams": self.num_beams, "early_stopping": True, **common}
        if self.strategy == "sample":
            return {"do_sample": True, "num_beams": 1, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0,
                    **common}
        raise ValueError(f"unknown decoding strategy {self.strategy!r}; use greedy, beam or sample")


@dataclass
class GenerationResult:
    token_ids: list[list[int]]  # generated ids per prompt, stop token and padding removed
    seconds: float
    generated_tokens: int
    lam_traces: list[list[float]]  # lambda per step per prompt (empty without an adapter or scorer)

    @property
    def seconds_per_token(self) -> float:
        return self.seconds / max(1, self.generated_tokens)


def generate(model, prompts: Sequence[Sequence[int]], *, stop_token_id: int, pad_token_id: int,
             settings: GenerationSettings = GenerationSettings(), adapter: PemaAdapter | None = None,
             head: OutputHead | None = None, key_source: KeySource | None = None, schedule: Schedule | None = None,
             horizons: torch.Tensor | None = None, progress: bool = True, desc: str = "decode",
             scorer: Callable[[torch.Tensor], torch.Tensor] | None = None,
             length_caps: torch.Tensor | None = None, max_prompt_tokens: int | None = None) -> GenerationResult:
    """Generate for every prompt (token ids). Without ``adapter`` or ``scorer`` this is the PLM alone (zero-shot).

    ``adapter`` + ``head`` mix in P_PEMA; ``scorer(key (rows, d) float32) -> log-probs (rows, vocab)`` instead mixes
    in any other distribution of the owner's key (the kNN-LM baseline). Either needs ``key_source``, ``schedule``
    and ``horizons`` (one per prompt). Prompts are sorted by length and left-padded per batch; results come back
    in input order. ``length_caps`` (one per prompt): the most tokens a row may generate before its stop token
    is forced (:class:`LengthCapProcessor`), with or without mixing. ``max_prompt_tokens``: the longest prompt
    decoded (:func:`pema.formats.tasks.prompt_token_bound` of ``data.max_tokens``; by default the model's context
    window less ``max_new_tokens``); a longer one is an OverlengthError before any batch is allocated.
    """
    if scorer is not None and (adapter is not None or head is not None):
        raise ValueError("pass either adapter and head (PEMA) or scorer (e.g. kNN-LM), not both")
    mixing = adapter is not None or scorer is not None
    if adapter is not None and (head is None or key_source is None or schedule is None or horizons is None):
        raise ValueError("PEMA decoding needs adapter, head, key_source, schedule and horizons together")
    if scorer is not None and (key_source is None or schedule is None or horizons is None):
        raise ValueError("decoding with a scorer needs key_source, schedule and horizons too")
    if mixing and len(horizons) != len(prompts):
        raise ValueError(f"{len(horizons)} horizons for {len(prompts)} prompts")
    if length_caps is not None and (len(length_caps) != len(prompts) or bool((length_caps < 1).any())):
        raise ValueError(f"length_caps needs one cap >= 1 per prompt, got {len(length_caps)} for {len(prompts)}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    check_prompts(model, prompts, max_prompt_tokens, settings.max_new_tokens)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    traces: list[list[float]] = [[] for _ in prompts]
    total_tokens, start = 0, time.perf_counter()
    torch.manual_seed(settings.seed)
    bar = sequence_bar(len(prompts), desc, progress)
    for b in range(0, len(order), settings.batch_size):
        idx = order[b : b + settings.batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.as_tensor(list(prompts[i]))
            mask[row, width - len(prompts[i]) :] = 1
        kwargs = dict(settings.generate_kwargs(), max_new_tokens=settings.max_new_tokens, eos_token_id=stop_token_id,
                      pad_token_id=pad_token_id)
        proc, procs = None, LogitsProcessorList()
        if mixing:
            proc = (PemaLogitsProcessor(adapter, head, key_source.last_key, schedule, horizons[idx], width,
                                        stop_token_id)
                    if scorer is None else
                    MixtureLogitsProcessor(scorer, key_source.last_key, schedule, horizons[idx], width,
                                           stop_token_id=stop_token_id))
            procs.append(proc)
        if length_caps is not None:  # after the mixture: the forced stop is final
            procs.append(LengthCapProcessor(length_caps[idx], width, stop_token_id))
        if procs:
            kwargs["logits_processor"] = procs
        with torch.no_grad(), (key_source if mixing else _null()):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for row, i in enumerate(idx):
            seq = out[row, width:].tolist()
            if stop_token_id in seq:
                seq = seq[: seq.index(stop_token_id)]
            outputs[i] = seq
            total_tokens += len(seq) + 1
            if proc is not None:  # the row's own steps: its tokens and the stop token, not the batch's tail
                traces[i] = [float(step[row]) for step in proc.lam_trace[: len(seq) + 1]]
        bar.update(len(idx))
    bar.close()
    return GenerationResult(outputs, time.perf_counter() - start, total_tokens, traces)


def sequence_bar(total: int, desc: str, progress: bool):
    """The decoding bar of one system: sequences done of ``total``. Kept when closed (``leave``), so its last frame
    is the finished count: a bar closed with ``leave=False`` ends on the last frame tqdm drew, which, when the
    sequences finish within tqdm's ``mininterval``, is 0% (and the relay of a Ray task keeps that frame)."""
    return tqdm(total=total, desc=desc, unit="seq", disable=not progress, leave=True)


def check_prompts(model, prompts: Sequence[Sequence[int]], bound: int | None, max_new_tokens: int) -> None:
    """OverlengthError naming the first prompt over ``bound`` (None: the model's context window, when its config
    declares one, less ``max_new_tokens``), before anything is sized by it."""
    what = "data.max_tokens"
    if bound is None:
        if (window := context_window(model)) is None:
            return
        bound, what = max(1, window - max_new_tokens), f"the model's context window of {window} less max_new_tokens"
    if over := [i for i, p in enumerate(prompts) if len(p) > bound]:
        raise OverlengthError(f"prompt {over[0]} has {len(prompts[over[0]]):,} tokens, over the {bound:,} that "
                              f"{what} allows ({len(over)} prompt(s) over it); shorten or cut the text "
                              "(data.overlength=truncate) or raise data.max_tokens; nothing was decoded")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
