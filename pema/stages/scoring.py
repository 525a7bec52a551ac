"""Corpus-level scoring (sacrebleu BLEU, chrF, TER) and the PEMA seed's output post-processing.

Raw scores are always reported; post-processed scores are an optional second view, so a paper-style
number (which used the seed's clean-up) and an honest unprocessed number can be compared side by side.
:func:`paired_significance` adds sacreBLEU's paired bootstrap test (95% intervals, p-values against a baseline).
"""

from __future__ import annotations

import os
import re
import threading
import unicodedata
from contextlib import contextmanager

from sacrebleu.metrics import BLEU, CHRF, TER

# Characters the seed's ema_generate.py deletes from every prediction before writing lm_pred.txt
# (newlines are deleted outright, not replaced by spaces, so a prediction becomes one line).
_DELETED_CHARS = str.maketrans("", "", "\x03\r\x13\n")

# The seed's postprocess_generated_opt.py cuts, in this order, each of these patterns and everything
# after it on the line (except the "Convert ..." rule, which removes only up to the last "Formal:").
_CUT_RULES: tuple[re.Pattern, ...] = tuple(
    re.compile(p)
    for p in (
        r" I'm not sure.*",  # chatter such as " I'm not sure how to translate ..."
        r" I'm\" .*",
        r" I'm.*",
        r" I 50%.*",
        r"Convert the following informal sentence .*Formal:",  # an echoed GYAFC prompt
        r"Translate this from English to German:.*",  # the model starting the next WMT example
        r" I\..*",
        r" \.\.\.\.\.\..*",  # a run of six dots and what follows
    )
)

# An immediately repeated word ("the the"), case-sensitive, word boundaries on both sides.
_REPEATED_WORD = re.compile(r"\b(\w+) \1\b")


def postprocess(text: str) -> str:
    """Clean one generated hypothesis the way the PEMA seed did before reporting BLEU.

    Source: the authors' repository (github.com/agwaBom/PEMA), ``ema_generate.py`` (which writes
    ``lm_pred.txt``) followed by ``postprocess_generated_opt.py``.  Reimplemented here:

    1. delete the control characters ``\\x03``, ``\\x13``, ``\\r`` and every newline (deleted, not
       replaced by a space), so the hypothesis is a single line as in the seed's ``lm_pred.txt``;
    2. cut off run-on chatter: ``" I'm"`` (covers ``" I'm not sure"`` and ``" I'm\\" "``), ``" I 50%"``,
       ``" I."`` and ``" ......"`` together with everything after them; an echoed
       ``"Translate this from English to German:"`` and everything after it; and an echoed
       ``"Convert the following informal sentence ... Formal:"`` span;
    3. collapse immediately repeated words (``"das das Haus"`` -> ``"das Haus"``), repeating until
       nothing changes (the seed ran 1000 passes).

    Surrounding whitespace is left as the seed left it (none of the three metrics depends on it).
    """
    text = text.translate(_DELETED_CHARS)
    for rule in _CUT_RULES:
        text = rule.sub("", text)
    while True:
        collapsed = _REPEATED_WORD.sub(r"\1", text)
        if collapsed == text:
            return text
        text = collapsed


_postprocess_text = postprocess  # evaluate() has a keyword argument of the same name


def nfc(texts: list[str]) -> list[str]:
    """Every text in Unicode normal form NFC: a reference saved decomposed (NFD, as some macOS tools write) and a
    composed hypothesis are the same characters to every metric."""
    return [unicodedata.normalize("NFC", t) for t in texts]


def score(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU, chrF and TER (sacrebleu defaults, one reference per hypothesis, both sides in NFC) with
    signatures."""
    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; they must pair up one to one"
        )
    if not hypotheses:
        raise ValueError("no hypotheses to score; pass at least one hypothesis/reference pair")
    for name, items in (("hypotheses", hypotheses), ("references", references)):
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise ValueError(f"{name}[{i}] is {type(item).__name__}, not str")
    hypotheses, references = nfc(hypotheses), nfc(references)
    result: dict = {}
    signatures: dict[str, str] = {}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF()), ("ter", TER())):
        result[name] = float(metric.corpus_score(hypotheses, [references]).score)
        signatures[name] = str(metric.get_signature())  # only complete after scoring (nrefs)
    return {**result, "signatures": signatures, "n": len(hypotheses)}


def evaluate(hypotheses, references, *, postprocess: bool = False) -> dict:
    """Raw scores always; scores after the seed's post-processing too when ``postprocess`` is set."""
    hypotheses, references = list(hypotheses), list(references)
    raw = score(hypotheses, references)
    post = score([_postprocess_text(h) for h in hypotheses], references) if postprocess else None
    return {"raw": raw, "post": post}


SIGNIFICANCE_SEED = 12345  # sacreBLEU's own default SACREBLEU_SEED; fixed so every table is reproducible
SIGNIFICANCE_SAMPLES = 1000  # sacreBLEU's default number of paired-bootstrap resamples
_SEED_LOCK = threading.Lock()  # SACREBLEU_SEED is process-wide: one PairedTest set-up at a time


@contextmanager
def _sacrebleu_seed(seed: int):
    """``SACREBLEU_SEED=seed`` for the block, then the previous value (or its absence) restored."""
    with _SEED_LOCK:
        previous = os.environ.get("SACREBLEU_SEED")
        os.environ["SACREBLEU_SEED"] = str(seed)
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("SACREBLEU_SEED", None)
            else:
                os.environ["SACREBLEU_SEED"] = previous


def _as_float(value) -> float | None:
    return None if value is None else float(value)


def paired_significance(hyps_by_system: dict[str, list[str]], references: list[str], *, baseline: str = "zero_shot",
                        n_samples: int = SIGNIFICANCE_SAMPLES, seed: int = SIGNIFICANCE_SEED) -> dict:
    """Paired bootstrap resampling of every system against ``baseline`` (sacreBLEU's own test, Koehn 2004):
    ``sacrebleu.significance.PairedTest(named_systems, metrics, [references], test_type="bs",
    n_samples=n_samples)`` with BLEU, chrF and TER at sacreBLEU's defaults (as :func:`score`), the baseline first.

    Returns ``{system: {"bleu": m, "chrf": m, "ter": m, "baseline", "n_samples", "seed", "signatures"}}`` for every
    system in ``hyps_by_system`` (the baseline included), where ``m`` is ``{"score", "mean", "ci", "ci_low",
    "ci_high", "p_value", "tied"}`` in plain floats: ``mean`` and ``ci`` are sacreBLEU's bootstrap mean and 95%
    half-width, ``[ci_low, ci_high] = mean -/+ ci``, and ``p_value`` the paired test's p against ``baseline`` (None
    for the baseline itself). ``signatures`` are sacreBLEU's, with ``bs:<n_samples>`` and ``seed:<seed>``.

    Seed: sacreBLEU reads it from ``SACREBLEU_SEED`` while the test is set up (the baseline's resampling there, the
    paired resampling then uses the seed it stored). This function sets that variable to ``seed`` only around the
    set-up, under a lock, and restores the previous value (or its absence), so results depend on ``seed`` alone
    and nothing leaks into the environment. Every system is resampled with the same indices.

    Ties: where a system's score, bootstrap mean and half-width all equal the baseline's (every resample scored
    them the same: identical hypotheses, or both at BLEU 0), sacreBLEU's strict count still gives
    p = 1 / (n_samples + 1); such a system gets ``p_value`` 1.0 and ``tied`` True instead.

    ValueError (naming the value) for an unknown ``baseline``, hypotheses and references of different lengths,
    no pairs, a non-string item, ``n_samples`` < 1 or ``seed`` < 1 (sacreBLEU treats seed 0 as "unseeded").
    """
    from sacrebleu.significance import PairedTest

    systems = {name: list(hyps) for name, hyps in hyps_by_system.items()}
    references = list(references)
    if baseline not in systems:
        raise ValueError(f"baseline={baseline!r} is not among the systems {list(systems)}")
    if not references:
        raise ValueError("no references: pass at least one hypothesis/reference pair")
    for name, hyps in systems.items():
        if len(hyps) != len(references):
            raise ValueError(f"system {name!r} has {len(hyps)} hypotheses but there are {len(references)} "
                             "references; they must pair up one to one")
        for i, item in enumerate(hyps):
            if not isinstance(item, str):
                raise ValueError(f"system {name!r}: hypotheses[{i}] is {type(item).__name__}, not str")
    for i, item in enumerate(references):
        if not isinstance(item, str):
            raise ValueError(f"references[{i}] is {type(item).__name__}, not str")
    for label, value in (("n_samples", n_samples), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label}={value!r} must be an integer >= 1")

    systems, references = {name: nfc(hyps) for name, hyps in systems.items()}, nfc(references)
    order = [baseline, *(s for s in systems if s != baseline)]
    metrics = {"bleu": BLEU(), "chrf": CHRF(), "ter": TER()}
    with _sacrebleu_seed(seed):
        test = PairedTest([(s, systems[s]) for s in order], metrics, [references], test_type="bs",
                          n_samples=n_samples)
    signatures, scores = test()
    names = [k for k in scores if k != "System"]  # sacreBLEU's metric names (BLEU, chrF2, TER), in metrics' order
    if len(names) != len(metrics):
        raise RuntimeError(f"sacreBLEU returned metrics {names}, expected one per {list(metrics)}")
    out: dict = {s: {"baseline": baseline, "n_samples": n_samples, "seed": seed,
                     "signatures": {key: str(signatures[name]) for key, name in zip(metrics, names)}} for s in order}
    for key, name in zip(metrics, names):
        base = scores[name][0]
        for system, result in zip(order, scores[name]):
            mean, ci = float(result.mean), float(result.ci)
            tied = system != baseline and (result.score, result.mean, result.ci) == (base.score, base.mean, base.ci)
            out[system][key] = {"score": float(result.score), "mean": mean, "ci": ci, "ci_low": mean - ci,
                                "ci_high": mean + ci, "p_value": 1.0 if tied else _as_float(result.p_value),
                                "tied": tied}
    return {s: out[s] for s in systems}


def significance_against(hyps_by_system: dict[str, list[str]], references: list[str], baselines, *,
                         n_samples: int = SIGNIFICANCE_SAMPLES, seed: int = SIGNIFICANCE_SEED) -> dict:
    """:func:`paired_significance` once per name in ``baselines`` -> ``{system: {baseline: entry}}`` (every system,
    in ``hyps_by_system``'s order; the same seed for each test, so a system's interval is the same in each)."""
    baselines = list(dict.fromkeys(baselines))
    out: dict = {s: {} for s in hyps_by_system}
    for b in baselines:
        for system, entry in paired_significance(hyps_by_system, references, baseline=b, n_samples=n_samples,
                                                 seed=seed).items():
            out[system][b] = entry
    return out

