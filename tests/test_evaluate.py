"""Tests for pema.stages.scoring: sacrebleu scoring and the seed's post-processing."""

import pytest
import sacrebleu

from pema.stages.scoring import evaluate, postprocess, score

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


# ---- paired significance (sacreBLEU's paired bootstrap) ----

SIG_REFS = ["Das Haus ist sehr klein.", "Der Hund bellt.", "Ich trinke gern Kaffee.", "Es regnet heute.",
            "Wir fahren morgen nach Berlin.", "Das Essen war gut."]
SIG_A = ["Das Haus ist klein.", "Der Hund bellt laut.", "Ich mag Kaffee sehr.", "Heute regnet es.",
         "Wir fahren nach Berlin.", "Das Essen war sehr gut."]
SIG_B = ["Ein Haus ist klein.", "Der Hund bellt.", "Ich trinke Kaffee.", "Es regnet.",
         "Morgen fahren wir nach Berlin.", "Essen gut."]
POOR = ["x y z"] * len(SIG_REFS)


def _direct(named, seed, monkeypatch):
    from sacrebleu.metrics import BLEU, CHRF, TER
    from sacrebleu.significance import PairedTest

    monkeypatch.setenv("SACREBLEU_SEED", str(seed))
    _, scores = PairedTest(named, {"bleu": BLEU(), "chrf": CHRF(), "ter": TER()}, [SIG_REFS], test_type="bs",
                           n_samples=1000)()
    monkeypatch.delenv("SACREBLEU_SEED")
    return {key: scores[name] for key, name in (("bleu", "BLEU"), ("chrf", "chrF2"), ("ter", "TER"))}


def test_significance_equals_sacrebleu_paired_test(monkeypatch):
    from pema.stages.scoring import paired_significance

    systems = {"zero_shot": SIG_A, "b": SIG_B, "ref": SIG_REFS}
    got = paired_significance(systems, SIG_REFS, seed=777)
    direct = _direct([(s, h) for s, h in systems.items()], 777, monkeypatch)
    assert list(got) == ["zero_shot", "b", "ref"]
    for metric, results in direct.items():
        for system, result in zip(systems, results):
            m = got[system][metric]
            assert m["score"] == pytest.approx(result.score, abs=1e-6)
            assert m["mean"] == pytest.approx(float(result.mean), abs=1e-6)
            assert m["ci"] == pytest.approx(float(result.ci), abs=1e-6)
            assert (m["ci_low"], m["ci_high"]) == pytest.approx((m["mean"] - m["ci"], m["mean"] + m["ci"]), abs=1e-9)
            if system == "zero_shot":
                assert m["p_value"] is None and result.p_value is None
            else:
                assert m["p_value"] == pytest.approx(result.p_value, abs=1e-6) and not m["tied"]
            assert all(type(m[k]) is float for k in ("score", "mean", "ci", "ci_low", "ci_high"))
    entry = got["b"]
    assert (entry["baseline"], entry["n_samples"], entry["seed"]) == ("zero_shot", 1000, 777)
    assert "bs:1000" in entry["signatures"]["bleu"] and "seed:777" in entry["signatures"]["chrf"]
    assert got["zero_shot"]["bleu"]["score"] == pytest.approx(score(SIG_A, SIG_REFS)["bleu"])


def test_significance_is_deterministic_and_leaves_the_environment_alone(monkeypatch):
    import os

    from pema.stages.scoring import paired_significance

    systems = {"zero_shot": SIG_A, "b": SIG_B}
    monkeypatch.delenv("SACREBLEU_SEED", raising=False)
    first = paired_significance(systems, SIG_REFS, seed=5)
    assert "SACREBLEU_SEED" not in os.environ
    monkeypatch.setenv("SACREBLEU_SEED", "99")
    assert paired_significance(systems, SIG_REFS, seed=5) == first  # the seed argument, not the environment
    assert os.environ["SACREBLEU_SEED"] == "99"
    other = paired_significance(systems, SIG_REFS, seed=6)
    assert other["b"]["bleu"]["score"] == first["b"]["bleu"]["score"]
    assert other["b"]["chrf"]["mean"] != first["b"]["chrf"]["mean"]  # other resamples


def test_identical_system_is_not_significant_and_references_are():
    from pema.stages.scoring import paired_significance

    got = paired_significance({"zero_shot": POOR, "same": list(POOR), "copy": SIG_A, "ref": SIG_REFS}, SIG_REFS,
                              baseline="zero_shot")
    for metric in ("bleu", "chrf", "ter"):
        same = got["same"][metric]
        assert same["p_value"] >= 0.5 and same["tied"]  # sacreBLEU alone would say 1/1001 here
        assert same["ci_low"] <= same["score"] <= same["ci_high"]
        assert got["ref"][metric]["p_value"] < 0.05 and not got["ref"][metric]["tied"]
        assert got["copy"][metric]["p_value"] < 0.05
    assert got["zero_shot"]["bleu"]["p_value"] is None and got["zero_shot"]["bleu"]["ci"] >= 0
    vs_copy = paired_significance({"copy": SIG_A, "twin": list(SIG_A)}, SIG_REFS, baseline="copy")
    assert vs_copy["twin"]["bleu"]["p_value"] == 1.0
    assert vs_copy["twin"]["bleu"]["ci_low"] <= vs_copy["twin"]["bleu"]["score"] <= vs_copy["twin"]["bleu"]["ci_high"]


def test_significance_bad_input_is_named():
    from pema.stages.scoring import paired_significance

    with pytest.raises(ValueError, match="baseline='nope'"):
        paired_significance({"zero_shot": SIG_A}, SIG_REFS, baseline="nope")
    with pytest.raises(ValueError, match="'short' has 2 hypotheses but there are 6 references"):
        paired_significance({"zero_shot": SIG_A, "short": SIG_A[:2]}, SIG_REFS)
    with pytest.raises(ValueError, match=r"hypotheses\[1\] is int"):
        paired_significance({"zero_shot": SIG_A, "b": ["a", 3, "c", "d", "e", "f"]}, SIG_REFS)
    with pytest.raises(ValueError, match="no references"):
        paired_significance({"zero_shot": []}, [])
    for kw, text in (({"seed": 0}, "seed=0"), ({"n_samples": 0}, "n_samples=0"), ({"seed": 1.5}, "seed=1.5")):
        with pytest.raises(ValueError, match=text):
            paired_significance({"zero_shot": SIG_A}, SIG_REFS, **kw)


def test_significance_against_several_baselines_and_formatting():
    from pema.stages.scoring import paired_significance, significance_against
    from pema.stages.tables import format_interval, format_p

    systems = {"zero_shot": SIG_A, "b": SIG_B, "ref": SIG_REFS}
    got = significance_against(systems, SIG_REFS, ["b", "zero_shot"])
    assert list(got) == list(systems) and all(list(v) == ["b", "zero_shot"] for v in got.values())
    assert got["ref"]["zero_shot"] == paired_significance(systems, SIG_REFS)["ref"]
    assert got["b"]["b"]["bleu"]["p_value"] is None and got["b"]["zero_shot"]["bleu"]["p_value"] is not None
    assert got["ref"]["b"]["bleu"]["mean"] == got["ref"]["zero_shot"]["bleu"]["mean"]  # same resamples
    m = {"score": 0.834, "ci_low": 0.512, "ci_high": 1.2, "p_value": 0.0421}
    assert format_interval(m) == "0.83 [0.51, 1.20]" and format_interval(None, 1.0) == "1.00"
    assert format_p(m) == "0.042" and format_p({"p_value": None}) == "-" and format_p(None) == "-"
    assert format_p({"p_value": 1 / 10001}) == "<0.001"


def test_scores_compare_texts_in_one_unicode_normal_form():
    import unicodedata

    from pema.stages.scoring import paired_significance, score

    ref = "Das Café ist geöffnet."
    decomposed = unicodedata.normalize("NFD", ref)
    assert decomposed != ref
    assert score([ref], [decomposed])["bleu"] == pytest.approx(100.0)  # NFC on both sides: the same sentence
    sig = paired_significance({"zero_shot": [decomposed], "pema": [ref]}, [ref], n_samples=10)
    assert sig["pema"]["bleu"]["score"] == pytest.approx(100.0) and sig["pema"]["bleu"]["tied"]
