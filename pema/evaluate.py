"""Corpus-level scoring (sacrebleu BLEU, chrF, TER) and the PEMA seed's output post-processing.

Raw scores are always reported; post-processed scores are an optional second view, so a paper-style
number (which used the seed's clean-up) and an honest unprocessed number can be compared side by side.
"""

from __future__ import annotations

import re

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


def score(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU, chrF and TER (sacrebleu defaults, one reference per hypothesis) with signatures."""
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
