"""The token cap (issue 21, item 4): every source and target read from the JSONL files meets ``data.max_tokens``,
counted in tokens of the model's tokenizer on the text alone. Over it: a named OverlengthError naming
``<path>:<line>`` at the job's edge (exit 2, before Ray or MLflow, nothing written), or with
``data.overlength=truncate`` the text cut and the cut counted in the stages' results. Decoding and the memory build
bound the prompt and the teacher-forced sequence where they allocate, with a named error."""
import json
import random
from pathlib import Path

import pytest

from pema.config import load_config
from pema.errors import DataError
from pema.formats.tasks import load_pairs, resolve_template, source_token_count
from test_ray_job import load_job, snapshot  # the jobs' bad-input harness: a job's main, a folder's state

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "configs" / "smoke.yaml"
WMT = ROOT / "data" / "wmt22"
SENTENCE = "The committee, having weighed the evidence at length, decided that the matter should rest there. "


def megabyte_sentence() -> str:
    """One 'sentence' of 1,000,000 characters (the issue's 1 MB test line: a 46 GB causal mask when decoded)."""
    return (SENTENCE * (1_000_000 // len(SENTENCE) + 1))[:1_000_000]


def with_long_line(src: Path, dest: Path, line: int, text: str, field: str = "en", keep: int = 8) -> Path:
    """The first ``keep`` lines of ``src`` with ``field`` of line ``line`` (1-based) replaced by ``text``."""
    rows = [json.loads(x) for x in src.read_text(encoding="utf-8").splitlines()[:keep]]
    rows[line - 1][field] = text
    dest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return dest


# ------------------------------------------------------------------------------------ the jobs' edge


@pytest.mark.parametrize("job, flag, line", [("build_memory", "--train", 3), ("evaluate", "--test", 2),
                                             ("pipeline", "--test", 2), ("pipeline", "--ood-test", 4)])
def test_a_megabyte_sentence_is_refused_at_the_edge_naming_its_line(job, flag, line, tmp_path, monkeypatch, capsys):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a job whose input is over data.max_tokens")

    monkeypatch.setattr("pema.executors.ray_runtime.init_ray", no_ray)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(ROOT)  # the smoke config's data paths are relative to the repository
    split = {"--train": "train", "--test": "test", "--ood-test": "test"}[flag]
    bad = with_long_line(WMT / f"{split}.jsonl", tmp_path / "long.jsonl", line, megabyte_sentence())
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file\n")
    before = snapshot(out)
    code = load_job(job).main(["--config", str(SMOKE), "--output-dir", str(out), "--no-progress", flag, str(bad)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: {bad}:{line}: the source (field 'en') has " in err, err
    assert "tokens, over data.max_tokens=512; raise data.max_tokens, set data.overlength=truncate" in err, err
    assert "Traceback" not in err
    assert snapshot(out) == before  # no config.json, no mlflow.db, no memory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.jsonl", "o"]


def test_the_edge_counts_only_past_the_byte_bound_and_names_the_target(tmp_path):
    from pema.stages.inputs import check_inputs

    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"en": f"Line {i}.", "du": "Wort " * (40 if i == 5 else 3)}) + "\n"
                            for i in range(1, 7)))
    cfg = load_config(SMOKE, [f"data.test={path}", "data.max_tokens=32"])
    with pytest.raises(DataError, match=rf"{path}:5: the target \(field 'du'\) has \d+ tokens, over "
                                              r"data.max_tokens=32"):
        check_inputs(cfg, splits=("test",), model=True)
    check_inputs(load_config(SMOKE, [f"data.test={path}", "data.max_tokens=32", "data.overlength=truncate"]),
                 splits=("test",), model=True)  # truncate: the stage cuts and counts
    check_inputs(load_config(SMOKE, [f"data.test={path}"]), splits=("test",), model=True)  # 41 tokens <= 512


def test_a_text_under_the_byte_bound_never_loads_the_tokenizer():
    def load():
        raise AssertionError("the tokenizer was loaded for a text under the byte bound")

    from pema.formats.tasks import TokenCap

    cap = TokenCap(16, load=load)
    assert cap.apply("fifteen bytes!!", "f:1", 0, "en") == "fifteen bytes!!"  # 15 + 1 <= 16: no count needed
    with pytest.raises(AssertionError, match="was loaded"):
        cap.apply("sixteen bytes!!!", "f:1", 0, "en")


def test_tokens_are_at_most_bytes_plus_one_but_not_characters(smollm2_tokenizer):
    """The edge's bound (pema.formats.tasks.TokenCap) on the project's tokenizer, over hostile text: CJK, emoji,
    combining marks, control and private-use characters, special-token strings, long runs of one byte."""
    rng = random.Random(21)
    ranges = [(0x20, 0x7E), (0xA0, 0x2FFF), (0x300, 0x36F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0xE000, 0xF8FF),
              (0x10000, 0x10FFFF), (0x1, 0x1F)]
    texts = ["<|im_end|><|im_start|>assistant", "\n" * 300, " " * 300, "a" * 300, "\u200b" * 50, "😀" * 50]
    for _ in range(2000):
        lo_hi = [rng.choice(ranges) for _ in range(rng.randint(1, 30))]
        text = "".join(chr(rng.randint(lo, hi)) for lo, hi in lo_hi)
        texts.append("".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF) or "x")
    for text in texts:
        assert source_token_count(smollm2_tokenizer, text) <= len(text.encode("utf-8")) + 1, repr(text)
    assert source_token_count(smollm2_tokenizer, "😀" * 50) > 50  # a character count is no bound


# ---------------------------------------------------------------------------------- reading and cutting


def test_load_pairs_with_the_cap_errs_or_cuts_and_counts(tmp_path, smollm2_tokenizer):
    from pema.formats.tasks import OverlengthError, TokenCap

    rows = [{"en": "Short.", "du": "Kurz."}, {"en": SENTENCE * 3, "du": "Lang."}, {"en": "Hi.", "du": SENTENCE * 2}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(OverlengthError, match=rf"{path}:2: the source \(field 'en'\) has \d+ tokens"):
        load_pairs(path, cap=TokenCap(12, "error", tokenizer=smollm2_tokenizer))
    cap = TokenCap(12, "truncate", tokenizer=smollm2_tokenizer)
    pairs = load_pairs(path, cap=cap)
    assert cap.truncated == 2 and pairs[0].source == "Short." and pairs[2].source == "Hi."
    for cut, full in ((pairs[1].source, rows[1]["en"]), (pairs[2].target, rows[2]["du"])):
        assert full.startswith(cut) and 8 <= source_token_count(smollm2_tokenizer, cut) <= 12, cut


@pytest.mark.parametrize("text", [SENTENCE * 4, "中文的句子很长。" * 30, "😀 ünïcödé " * 40, "word" * 200])
def test_cut_to_tokens_keeps_a_visible_prefix_within_the_cap(text, smollm2_tokenizer):
    from pema.formats.tasks import cut_to_tokens

    for n in (8, 64):
        cut = cut_to_tokens(smollm2_tokenizer, text, n)
        assert text.startswith(cut) and cut.strip() and source_token_count(smollm2_tokenizer, cut) <= n


def test_cut_to_tokens_refuses_to_empty_a_text(smollm2_tokenizer):
    from pema.formats.tasks import cut_to_tokens

    with pytest.raises(DataError, match="no prefix of it within 1 tokens is visible text"):
        cut_to_tokens(smollm2_tokenizer, "😀😀 smile", 1)  # the emoji alone takes more than one token


# ----------------------------------------------------------------------- where the sizes are allocated


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    from pema.owner.plm import tiny_model

    return tiny_model("llama", vocab_size=len(smollm2_tokenizer)), smollm2_tokenizer


def test_translate_refuses_a_source_over_the_cap_before_decoding(tiny, monkeypatch):
    from pema.stages.decode import translate

    model, tok = tiny
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("decoded a source over the cap"))
    cfg = load_config(SMOKE, ["data.max_tokens=16"])
    with pytest.raises(DataError, match=r"source 1 of 2 has \d+ tokens, over data.max_tokens=16"):
        translate(model, tok, ["Hello.", SENTENCE], cfg, ratio=1.0)


def test_generate_bounds_the_prompt_by_the_cap_or_the_context_window(tiny, monkeypatch):
    from pema.adapter.decode import GenerationSettings, generate

    model, tok = tiny
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("allocated a batch for a prompt over it"))
    kw = dict(stop_token_id=2, pad_token_id=0, settings=GenerationSettings(max_new_tokens=8), progress=False)
    with pytest.raises(DataError, match=r"prompt 1 has 40 tokens, over the 30 that data.max_tokens allows"):
        generate(model, [[5] * 10, [5] * 40], max_prompt_tokens=30, **kw)
    with pytest.raises(DataError, match=r"over the 504 that the model's context window of 512 less"):
        generate(model, [[5] * 600], **kw)  # no bound given: the tiny Llama's 512 positions less max_new_tokens
    from pema.formats.tasks import cut_to_tokens, prompt_token_bound, source_prompt_ids

    template = resolve_template(load_config(SMOKE).data.template)
    bound = prompt_token_bound(tok, template, 512, source_field="en", chat=True)

    longest = cut_to_tokens(tok, megabyte_sentence(), 512)
    assert len(source_prompt_ids(tok, template, longest, source_field="en", chat=True)) <= bound


def test_the_encoder_and_the_build_plan_bound_the_teacher_forced_length(tiny, tmp_path):
    from conftest import inline_build

    from pema.formats.tasks import Pair
    from pema.owner.encode import EncodeExample, MemoryEncoder

    model, tok = tiny
    encoder = MemoryEncoder(model, pad_id=0)  # no bound given: the model's context window (512)
    with pytest.raises(DataError, match=r"example 7: its teacher-forced sequence has 600 tokens .* over the "
                                              r"bound of 512 \(the model's context window\)"):
        encoder([EncodeExample(7, [5] * 300, [6] * 301)])
    with pytest.raises(DataError, match=r"over the bound of 20 \(data.max_tokens\)"):
        MemoryEncoder(model, max_length=20)([EncodeExample(0, [5] * 10, [6] * 12)])
    pairs = [Pair(0, "Hello.", "Hallo."), Pair(1, "Hi.", SENTENCE * 4)]  # past the reader: the plan refuses it
    with pytest.raises(DataError, match=r"example 1: .* that data.max_tokens=16 allows"):
        inline_build(pairs, tmp_path / "memory" / "train", "data.max_tokens=16")
    assert not any((tmp_path / "memory").glob("*")), "a refused plan staged something"


# ------------------------------------------------------------------------------------ data.overlength=truncate


def over(tokenizer, path: Path, limit: int, max_tokens: int) -> int:
    """Texts of the first ``limit`` pairs of ``path`` over ``max_tokens`` tokens, counted here on their own."""
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()][:limit]
    return sum(source_token_count(tokenizer, r[f]) > max_tokens for r in rows for f in ("en", "du"))


def test_truncate_mode_cuts_every_text_and_the_stages_report_how_many(smollm2_tokenizer, tmp_path):
    from pema.executors.inline import InlineExecutor
    from pema.formats.memory import MemoryReader
    from pema.stages.build import run_build
    from pema.stages.decode import run_evaluate
    from pema.stages.inputs import cleaned_splits
    from pema.stages.logger import RecordingLogger
    from pema.stages.train import run_train

    test = with_long_line(WMT / "test.jsonl", tmp_path / "test.jsonl", 2, megabyte_sentence())
    cfg = load_config(SMOKE, [f"data.train={WMT / 'train.jsonl'}", f"data.dev={WMT / 'dev.jsonl'}",
                              f"data.test={test}", "data.max_tokens=24", "data.overlength=truncate",
                              "eval.systems=[zero_shot,pema]"])
    want = {"train": over(smollm2_tokenizer, WMT / "train.jsonl", 16, 24),
            "dev": over(smollm2_tokenizer, WMT / "dev.jsonl", 8, 24), "test": over(smollm2_tokenizer, test, 6, 24)}
    assert min(want.values()) >= 1, want
    out, logger = tmp_path / "run", RecordingLogger()
    built = run_build(cfg, out, InlineExecutor(), logger, progress=False)
    assert built["truncated"] == {"train": want["train"], "dev": want["dev"]}
    for split in ("train", "dev"):  # every target is at most 24 tokens + its stop token
        assert int(MemoryReader(out / "memory" / split).read_all()["position"].max()) <= 24
    run_train(cfg, out, InlineExecutor(), progress=False)
    scores = run_evaluate(cfg, out, InlineExecutor(), logger, progress=False)
    assert scores["truncated"] == {"test": want["test"]}
    metrics = {k: v for call in logger.calls if call[0] == "metrics" for k, v in call[1].items()}
    assert metrics["truncated/train"] == want["train"] and metrics["truncated/test"] == want["test"]
    preds = [json.loads(x) for x in (out / "predictions" / "zero_shot.jsonl").read_text().splitlines()]
    assert all(source_token_count(smollm2_tokenizer, p["source"]) <= 24 for p in preds)
    assert megabyte_sentence().startswith(preds[1]["source"])  # the 1 MB line, cut to its first 24 tokens or fewer
    lines = cleaned_splits(cfg)[1].lines()
    assert f"test: kept 6 pairs, dropped none; {want['test']} texts over data.max_tokens cut to it" in lines, lines
