"""Pair hygiene (pema/formats/hygiene.py) and the cleaned splits every stage reads (pema/stages/inputs.py)."""
import json

import pytest

from pema.config import load_config
from pema.errors import DataError
from pema.formats.hygiene import clean_splits, guess_language, normalize
from pema.formats.tasks import Pair
from pema.stages.inputs import cleaned_splits, split_pairs

EN_DE = ("en", "de")


def pairs(*items):
    return [Pair(index=i, source=s, target=t) for i, (s, t) in enumerate(items)]


def test_normalize_folds_case_space_and_unicode_form():
    assert normalize("  Das Cafe\u0301   IST\tgut ") == normalize("das café ist gut")


@pytest.mark.parametrize("text, lang", [
    ("Enjoy unlimited access to the ideas and opinions of the world's leading thinkers", "en"),
    ("Es war noch nie leicht, ein rationales Gespräch über den Wert von Gold zu führen.", "de"),
    ("Kleine Schritte in Richtung Bankenunion", None),  # too few stop words: no guess
])
def test_guess_language(text, lang):
    assert guess_language(text, EN_DE) == lang


def test_each_rule_drops_with_its_reason_and_kept_pairs_are_renumbered():
    train = pairs(("Gold is up.", "Gold steigt."),
                  ("Read it here.", "read it  HERE."),                                       # same_text
                  ("The market is not the state.", "The market is not the state of the art."),  # source_language
                  ("Gold is up.", "Gold ist gestiegen."),                                    # duplicate source
                  ("Prices fell.", "Die Preise sind gefallen."))
    test = pairs(("Prices fell.", "Preise fielen."),       # source seen in train
                 ("New text.", "Gold steigt."),           # target seen in train
                 ("Another one.", "Noch einer."))
    kept, report = clean_splits({"train": train, "test": test}, EN_DE)
    assert [p.source for p in kept["train"]] == ["Gold is up.", "Prices fell."]
    assert [p.index for p in kept["train"]] == [0, 1]
    assert [p.source for p in kept["test"]] == ["Another one."] and kept["test"][0].index == 0
    assert report.dropped["train"] == {"same_text": [1], "source_language": [2], "duplicate": [3]}
    assert report.dropped["test"] == {"in_train": [0, 1]}
    assert report.lines() == ["train: kept 2 pairs, dropped 1 duplicate, 1 same_text, 1 source_language",
                              "test: kept 1 pairs, dropped 2 in_train"]


def test_same_language_task_keeps_english_targets():
    kept, report = clean_splits({"train": pairs(("gonna go now", "I am going to leave now, as it is late."))}, None)
    assert len(kept["train"]) == 1 and report.total_dropped("train") == 0


def _write(path, rows):
    path.write_text("".join(json.dumps({"en": s, "du": t}) + "\n" for s, t in rows), encoding="utf-8")
    return str(path)


def test_split_pairs_cleans_against_earlier_splits(tmp_path):
    train = _write(tmp_path / "train.jsonl", [("A cat sat.", "Eine Katze saß."), ("Same.", "Same.")])
    dev = _write(tmp_path / "dev.jsonl", [("A dog ran.", "Ein Hund lief.")])
    test = _write(tmp_path / "test.jsonl", [("A cat sat.", "Die Katze saß."), ("A bird flew.", "Ein Vogel flog.")])
    ood = _write(tmp_path / "ood.jsonl", [("A dog ran.", "Der Hund rannte."), ("Rain.", "Regen.")])
    cfg = load_config("jobs/configs/smoke.yaml", [f"data.train={train}", f"data.dev={dev}", f"data.test={test}",
                                                  f"data.ood_test={ood}", "data.train_limit=null",
                                                  "data.dev_limit=null", "data.test_limit=null"])
    assert [p.source for p in split_pairs(cfg, "train")] == ["A cat sat."]
    assert [p.source for p in split_pairs(cfg, "test")] == ["A bird flew."]
    assert [p.source for p in split_pairs(cfg, "ood_test")] == ["Rain."]
    _, report = cleaned_splits(cfg)
    assert report.to_dict()["ood_test"] == {"kept": 1, "dropped": {"in_dev": 1}}
    raw = load_config("jobs/configs/smoke.yaml", [f"data.train={train}", "data.hygiene=false",
                                                  "data.train_limit=null"])
    assert len(split_pairs(raw, "train")) == 2


def test_a_split_emptied_by_hygiene_is_a_named_error(tmp_path):
    train = _write(tmp_path / "train.jsonl", [("A cat sat.", "Eine Katze saß.")])
    test = _write(tmp_path / "test.jsonl", [("A cat sat.", "Eine Katze saß.")])
    cfg = load_config("jobs/configs/smoke.yaml", [f"data.train={train}", f"data.test={test}",
                                                  "data.train_limit=null", "data.test_limit=null"])
    with pytest.raises(DataError, match=r"test\.jsonl: every pair of data\.test was dropped.*data\.hygiene=false"):
        split_pairs(cfg, "test")


def test_shipped_news_commentary_splits_are_clean_and_disjoint():
    cfg = load_config("jobs/configs/default.yaml", ["data.train_limit=null", "data.test_limit=null",
                                                    "data.dev_limit=null", "data.ood_test_limit=null"])
    kept, report = cleaned_splits(cfg)
    for split in ("train", "dev", "test"):
        assert report.total_dropped(split) == 0, report.lines()
    assert len(kept["dev"]) >= 200 and len(kept["test"]) >= 200
    seen = {normalize(p.source) for p in kept["train"]}
    assert not seen & {normalize(p.source) for p in kept["test"]}


def test_split_heldout_reproduces_the_shipped_splits_and_refuses_bad_input(tmp_path, capsys, monkeypatch):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("split_heldout", root / "jobs" / "split_heldout.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    monkeypatch.chdir(root)  # split.json records the input path as given
    assert job.main(["data/wmt22/train.jsonl", str(tmp_path / "nc"), "--dev", "200", "--test", "200"]) == 0
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "split.json"):
        assert (tmp_path / "nc" / name).read_bytes() == (root / "data/nc" / name).read_bytes(), name
    assert job.main([str(tmp_path / "missing.jsonl"), str(tmp_path / "x")]) == 2
    small = _write(tmp_path / "small.jsonl", [("A cat sat.", "Eine Katze saß."), ("A dog.", "Ein Hund.")])
    assert job.main([small, str(tmp_path / "y"), "--dev", "1", "--test", "1"]) == 2
    assert "fewer than --dev 1 + --test 1 + 1 training pair" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
