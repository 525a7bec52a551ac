"""Greedy decoding through the PLM owner's service: the session steps give, per row, the owner's key alone; the
data owner computes the PLM's next-token logits from it with the owner's exact output head (``plm_head``, by
default fetched once from the service) and mixes them with its adapter's distribution here.

The mixing is :mod:`pema.adapter.decode`'s own processors (:class:`~pema.adapter.decode.PemaLogitsProcessor`,
:class:`~pema.adapter.decode.MixtureLogitsProcessor`, :class:`~pema.adapter.decode.LengthCapProcessor`), called
step by step on the service's answers instead of inside ``generate()``, so both paths choose the same tokens:
greedy, finished rows padded, a batch ends when every row has stopped or at ``max_new_tokens``. Beam search,
sampling, n-gram bans and the repetition penalty need the owner's ``generate()`` and are refused here.

A row that has stopped leaves the session (the step's ``rows``), so the service computes and sends nothing more
for it. A session the service no longer holds (404: its replica was scaled down or restarted, or it expired) is
reopened with each live row's prompt and every token fed so far; the owner recomputes the cache and answers the
same step.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from pema.adapter.decode import (GenerationResult, GenerationSettings, LengthCapProcessor, MixtureLogitsProcessor,
                                 PemaLogitsProcessor, sequence_bar)
from pema.adapter.head import OutputHead
from pema.adapter.model import PemaAdapter
from pema.adapter.schedule import Schedule
from pema.errors import OwnerRequestError


def _step(client, session: str, live: list[int], going: list[int], fed: list[list[int]], key_dtype: str):
    """One step of the rows ``going`` (a subset of ``live``, the rows the session holds), or on 404 (the session
    is gone) a new session on their prompts plus ``fed`` (which already holds the chosen tokens):
    ``(session, keys of going)``."""
    keep = None if going == live else [live.index(r) for r in going]
    try:
        return session, client.step(session, [fed[r][-1] for r in going], keep)
    except OwnerRequestError as exc:
        if exc.status != 404:
            raise
    client.reopened = getattr(client, "reopened", 0) + 1
    return client.open_session([fed[r] for r in going], key_dtype)


def generate_remote(client, prompts: Sequence[Sequence[int]], *, stop_token_id: int, pad_token_id: int,
                    settings: GenerationSettings = GenerationSettings(), adapter: PemaAdapter | None = None,
                    head: OutputHead | None = None, schedule: Schedule | None = None,
                    horizons: torch.Tensor | None = None, progress: bool = True, desc: str = "decode",
                    scorer: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    length_caps: torch.Tensor | None = None, plm_head: OutputHead | None = None,
                    key_dtype: str = "float32") -> GenerationResult:
    """:func:`pema.adapter.decode.generate`'s contract (greedy only) with ``client``
    (:class:`~pema.adapter.remote.OwnerClient`) in place of the PLM and its key source. ``plm_head``: the owner's
    head that turns a key into the PLM's logits (default: ``head``, else ``client.output_head()``); ``key_dtype``:
    the keys' dtype on the wire (float32 keeps greedy tokens identical to in-process decoding)."""
    if settings.strategy != "greedy" or settings.no_repeat_ngram_size or settings.repetition_penalty != 1.0:
        raise ValueError("decoding through the owner's service is greedy without n-gram bans or repetition penalty: "
                         f"got decode.strategy={settings.strategy!r}, no_repeat_ngram_size="
                         f"{settings.no_repeat_ngram_size}, repetition_penalty={settings.repetition_penalty}")
    mixing = adapter is not None or scorer is not None
    if mixing and (schedule is None or horizons is None or (adapter is not None and head is None)):
        raise ValueError("mixed decoding needs schedule and horizons (and head with adapter)")
    plm_head = plm_head or head or client.output_head()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    traces: list[list[float]] = [[] for _ in prompts]
    total_tokens, start = 0, time.perf_counter()
    bar = sequence_bar(len(prompts), desc, progress)
    for b in range(0, len(order), settings.batch_size):
        idx = order[b : b + settings.batch_size]
        width = max(len(prompts[i]) for i in idx)
        fed = [list(prompts[i]) for i in idx]  # per row: the prompt and every token sent since
        session, key = client.open_session([list(f) for f in fed], key_dtype)
        live = list(range(len(idx)))  # the rows the session holds, in its order
        current = {"key": torch.from_numpy(key.astype("float32"))}
        procs, proc = [], None
        if mixing:
            source = lambda: current["key"]  # noqa: E731  (the key of this step's context)
            proc = (PemaLogitsProcessor(adapter, head, source, schedule, horizons[idx], width, stop_token_id)
                    if scorer is None else
                    MixtureLogitsProcessor(scorer, source, schedule, horizons[idx], width, stop_token_id=stop_token_id))
            procs.append(proc)
        if length_caps is not None:
            procs.append(LengthCapProcessor(length_caps[idx], width, stop_token_id))
        ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)  # only its width is read
        done = torch.zeros(len(idx), dtype=torch.bool)
        generated: list[list[int]] = [[] for _ in idx]
        try:
            for step in range(settings.max_new_tokens):
                with torch.no_grad():  # the PLM's logits, as its own head computes them, for the rows still going
                    scores = plm_head.from_key(current["key"][live])
                    if len(live) < len(idx):  # a stopped row's scores are never read: it is fed padding
                        scores = torch.zeros((len(idx), scores.shape[1])).index_copy_(0, torch.tensor(live), scores)
                    for p in procs:
                        scores = p(ids, scores)
                chosen = scores.argmax(-1)
                chosen = torch.where(done, torch.full_like(chosen, pad_token_id), chosen)
                for row in range(len(idx)):
                    if not done[row]:
                        generated[row].append(int(chosen[row]))
                done |= chosen == stop_token_id
                ids = torch.cat([ids, chosen[:, None]], dim=1)
                if bool(done.all()) or step + 1 == settings.max_new_tokens:
                    break
                going = [r for r in live if not done[r]]
                for row in going:
                    fed[row].append(int(chosen[row]))
                session, got = _step(client, session, live, going, fed, key_dtype)
                live, key = going, torch.zeros_like(current["key"])  # a stopped row's key is never read
                key[going] = torch.from_numpy(got.astype("float32"))
                current["key"] = key
        finally:
            try:
                client.close(session)
            except OwnerRequestError as exc:
                if exc.status != 404:  # a session already gone needs no closing
                    raise
        for row, i in enumerate(idx):
            seq = generated[row]
            if stop_token_id in seq:
                seq = seq[: seq.index(stop_token_id)]
            outputs[i] = seq
            total_tokens += len(seq) + 1
            if proc is not None:
                traces[i] = [float(s[row]) for s in proc.lam_trace[: len(seq) + 1]]
        bar.update(len(idx))
    bar.close()
    return GenerationResult(outputs, time.perf_counter() - start, total_tokens, traces)
