"""Pair hygiene: what is dropped from a split before anything is built, trained or scored, and why.

A split that keeps noise measures the noise. On the shipped News Commentary sample, publisher notices with an
English "German" side (and the same six notices repeated across the file) let kNN-LM copy training targets verbatim
into the test (corpus BLEU 5.1 on a slice that kept them, against 0.8 without). The rules, each with a reason code:

- ``same_text``: the two sides are the same text (after Unicode NFC, case folding and whitespace collapsing);
- ``source_language``: the target is written in the source's language (a stop-word vote, :func:`guess_language`),
  only for tasks whose two languages are known (:data:`TASK_LANGUAGES`; never for a same-language task such as
  formality transfer);
- ``duplicate``: the same source (normalized as above) already appears earlier in the split;
- ``in_<split>``: the source or the target already appears in an earlier split (train before dev before test),
  so held-out pairs are disjoint from training by content, not by line number.

Pure functions over :class:`~pema.formats.tasks.Pair`: no files. Kept pairs are renumbered 0..n-1 in file order.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from pema.formats.tasks import Pair

# The language pair of each named template: (source, target). None: a same-language task, no language rule.
TASK_LANGUAGES: dict[str, tuple[str, str] | None] = {"wmt22_en_de": ("en", "de"), "gyafc": None}

# Function words that are frequent in one language and rare as words of the other (no "in", "an", "was", "will").
STOP_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset("the of and to is that for it with as on be by are this not have from or at which but has they "
                    "their its more than would been were we our can who what there these those".split()),
    "de": frozenset("der die das und ist nicht zu den von mit sich des auf für im dem ein eine als auch es werden aus "
                    "er hat dass sie nach bei um wird sind wir noch wie oder aber einer zum zur durch über".split()),
}
MIN_VOTES = 3  # fewer stop words than this: too short to tell, no guess
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The content key of a text: NFC, case-folded, whitespace collapsed and stripped."""
    return _SPACE.sub(" ", unicodedata.normalize("NFC", text).casefold()).strip()


def guess_language(text: str, languages=("en", "de")) -> str | None:
    """The language among ``languages`` whose stop words ``text`` uses most, or None when fewer than
    :data:`MIN_VOTES` stop words are found or two languages tie."""
    words = _WORD.findall(normalize(text))
    votes = sorted(((sum(w in STOP_WORDS[lang] for w in words), lang) for lang in languages), reverse=True)
    if votes[0][0] < MIN_VOTES or (len(votes) > 1 and votes[0][0] == votes[1][0]):
        return None
    return votes[0][1]


@dataclass
class HygieneReport:
    """What :func:`clean_splits` kept and dropped, per split: ``dropped[split][reason]`` = 0-based input
    positions (pairs' original ``index``); ``truncated[split]``: texts cut to ``data.max_tokens`` when read."""

    kept: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)

    def total_dropped(self, split: str) -> int:
        return sum(len(v) for v in self.dropped.get(split, {}).values())

    def lines(self) -> list[str]:
        """One line per split: kept, and the dropped count by reason."""
        out = []
        for split, kept in self.kept.items():
            reasons = ", ".join(f"{len(v)} {r}" for r, v in sorted(self.dropped.get(split, {}).items()) if v)
            cut = f"; {n:,} texts over data.max_tokens cut to it" if (n := self.truncated.get(split)) else ""
            out.append(f"{split}: kept {kept:,} pairs" + (f", dropped {reasons}" if reasons else ", dropped none") + cut)
        return out

    def to_dict(self) -> dict:
        return {s: {"kept": k, "dropped": {r: len(v) for r, v in self.dropped.get(s, {}).items() if v},
                    **({"truncated": self.truncated[s]} if self.truncated.get(s) else {})}
                for s, k in self.kept.items()}


def pair_problem(pair: Pair, languages: tuple[str, str] | None) -> str | None:
    """The reason code that drops ``pair`` on its own (``same_text``, ``source_language``), or None."""
    if normalize(pair.source) == normalize(pair.target):
        return "same_text"
    if languages is not None and languages[0] != languages[1]:
        if guess_language(pair.target, languages) == languages[0]:
            return "source_language"
    return None


def clean_splits(splits: dict[str, list[Pair]], languages: tuple[str, str] | None) -> tuple[dict[str, list[Pair]],
                                                                                           HygieneReport]:
    """Apply every rule to ``splits`` (in the dict's order: train first, then the held-out splits), returning the
    kept pairs of each split, renumbered, and the report. Content seen in an earlier split (its source or its
    target) drops a later split's pair as ``in_<earlier split>``."""
    report, seen, out = HygieneReport(), {}, {}
    for name, pairs in splits.items():
        dropped: dict[str, list[int]] = {}
        kept: list[Pair] = []
        own_sources: set[str] = set()
        for pair in pairs:
            src, tgt = normalize(pair.source), normalize(pair.target)
            reason = pair_problem(pair, languages)
            if reason is None and src in own_sources:
                reason = "duplicate"
            if reason is None:
                reason = next((f"in_{earlier}" for earlier, keys in seen.items() if src in keys or tgt in keys), None)
            if reason is not None:
                dropped.setdefault(reason, []).append(pair.index)
                continue
            own_sources.add(src)
            kept.append(Pair(index=len(kept), source=pair.source, target=pair.target))
        seen[name] = own_sources | {normalize(p.target) for p in kept}
        out[name], report.kept[name], report.dropped[name] = kept, len(kept), dropped
    return out, report
