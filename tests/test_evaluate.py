"""Tests for pema.evaluate: sacrebleu scoring and the seed's post-processing."""

import pytest
import sacrebleu

from pema.evaluate import evaluate, postprocess, score

HYPS = ["Das Haus ist klein.", "Der Hund bellt laut.", "Ich mag Kaffee sehr."]
REFS = ["Das Haus ist sehr klein.", "Der Hund bellt.", "Ich trinke gern Kaffee."]


def test_identical_is_perfect():
    s = score(REFS, REFS)
    assert s["bleu"] == pytest.approx(100.0)
    assert s["chrf"] == pytest.approx(100.0)
    assert s["ter"] == pytest.approx(0.0)
    assert s["n"] == 3


def test_matches_sacrebleu_directly():
    s = score(HYPS, REFS)
    assert s["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert s["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    assert s["ter"] == pytest.approx(sacrebleu.corpus_ter(HYPS, [REFS]).score)
    assert 0.0 < s["bleu"] < 100.0 and s["ter"] > 0.0
    assert all(isinstance(v, float) for v in (s["bleu"], s["chrf"], s["ter"]))


def test_signatures():
    sigs = score(HYPS, REFS)["signatures"]
    assert set(sigs) == {"bleu", "chrf", "ter"}
    for sig in sigs.values():
        assert isinstance(sig, str) and "nrefs:1" in sig
    assert "tok:13a" in sigs["bleu"]


def test_length_mismatch_and_empty():
    with pytest.raises(ValueError, match=r"3 hypotheses but 2 references"):
        score(HYPS, REFS[:2])
    with pytest.raises(ValueError, match="no hypotheses"):
        score([], [])


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Das ist gut. I'm not sure this is right.", "Das ist gut."),
        ("Das ist gut. I'm a translator", "Das ist gut."),
        ("Das ist gut. I 50% sure", "Das ist gut."),
        ("Das ist gut. I. Translate", "Das ist gut."),
        ("Das ist gut ....... und mehr", "Das ist gut"),
        ("Hallo Welt.\n\nTranslate this from English to German: \nBye\nGerman: Tschüss",
         "Hallo Welt."),
        ("Hello. Convert the following informal sentence into a formal sentence: Informal: hi Formal: Hi.",
         "Hello.  Hi."),
        ("das das Haus ist ist ist gross.", "das Haus ist gross."),
        ("Das das Haus, the theory", "Das das Haus, the theory"),  # case-sensitive, whole words only
        ("Zeile\r\x03eins\nzwei\x13", "Zeileeinszwei"),
        ("Ein ganz normaler Satz.", "Ein ganz normaler Satz."),
    ],
)
def test_postprocess_rules(raw, expected):
    assert postprocess(raw) == expected


def test_evaluate_reports_raw_and_post():
    hyps = ["Das Haus ist klein. I'm not sure.", "Der Hund bellt bellt."]
    refs = ["Das Haus ist klein.", "Der Hund bellt."]
    out = evaluate(hyps, refs, postprocess=True)
    assert out["raw"] == score(hyps, refs)
    assert out["post"]["bleu"] == pytest.approx(100.0)
    assert out["raw"]["bleu"] < 100.0
    only_raw = evaluate(hyps, refs)
    assert only_raw["post"] is None and only_raw["raw"] == out["raw"]
