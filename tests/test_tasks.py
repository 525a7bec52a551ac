"""Tests for pema.formats.tasks: templates, JSONL loading, parallel-text conversion and the tokenization contract."""

import json
import os

import pytest

from pema.errors import ConfigError, DataError
from pema.formats.tasks import (
    TEMPLATES,
    Pair,
    load_pairs,
    parallel_to_jsonl,
    prompt_ids,
    render_instruction,
    resolve_template,
    source_token_count,
    stop_token_id,
    target_ids,
    tokenizer_hash,
    use_chat_template,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{m['role']}}\n{{m['content']}}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "\n", "user", "assistant",
         "Hello", "world", "Hallo", "Welt", "Translate", "this", ":"]


def make_tokenizer(chat_template=CHAT_TEMPLATE):
    """A tiny offline word-level tokenizer: words and '\\n' are tokens, raw mode prepends <s>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|[^\s]+"), behavior="removed", invert=True)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- templates -------------------------------------------------------------------------------

def test_templates_are_the_seed_strings():
    assert TEMPLATES["wmt22_en_de"] == "Translate this from English to German: \n{en}\nGerman: "
    assert TEMPLATES["gyafc"] == (
        "Convert the following informal sentence into a formal sentence: \nInformal: {informal}\nFormal: "
    )


def test_render_named_template():
    text = render_instruction(resolve_template("wmt22_en_de"), "Hello world.", source_field="en")
    assert text == "Translate this from English to German: \nHello world.\nGerman: "
    text = render_instruction(resolve_template("gyafc"), "gonna go", source_field="informal")
    assert text.endswith("\nInformal: gonna go\nFormal: ")


def test_custom_template_accepted():
    template = resolve_template("Paraphrase: {src} ->")
    assert render_instruction(template, "a {b}", source_field="src") == "Paraphrase: a {b} ->"


def test_template_without_placeholder_rejected():
    with pytest.raises(ConfigError, match="wmt22_en_de"):
        resolve_template("no placeholder here")


def test_render_wrong_or_extra_placeholder():
    with pytest.raises(ConfigError, match=r"\{en\}"):
        render_instruction("Text: {src}", "x", source_field="en")
    with pytest.raises(ConfigError, match="other"):
        render_instruction("{en} and {other}", "x", source_field="en")


# --- load_pairs --------------------------------------------------------------------------------

def test_load_pairs_good_file_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"en": "a", "du": "b"}\n\n  \n{"en": "c", "du": "d", "x": 1}\n', encoding="utf-8")
    assert load_pairs(path) == [Pair(0, "a", "b"), Pair(1, "c", "d")]


def test_load_pairs_limit_and_custom_fields(tmp_path):
    path = write_lines(tmp_path / "d.jsonl",
                       [json.dumps({"informal": f"i{k}", "formal": f"f{k}"}) for k in range(5)])
    pairs = load_pairs(path, source_field="informal", target_field="formal", limit=2)
    assert [(p.index, p.source, p.target) for p in pairs] == [(0, "i0", "f0"), (1, "i1", "f1")]


def test_load_pairs_bad_json_names_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"en": "a", "du": "b"}', '{"en": "c", "du": "d"}', '{"en": '])
    with pytest.raises(DataError, match="not valid JSON") as exc:
        load_pairs(path)
    assert f"{path}:3:" in str(exc.value)


def test_load_pairs_missing_field(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"en": "a", "du": "b"}', '{"en": "c", "de": "d"}'])
    with pytest.raises(DataError) as exc:
        load_pairs(path)
    msg = str(exc.value)
    assert ":2:" in msg and "'du'" in msg and "de, en" in msg


@pytest.mark.parametrize("target", ["", "  "])
def test_load_pairs_empty_target(tmp_path, target):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"en": "a", "du": target})])
    with pytest.raises(DataError, match=r":1: field 'du' is empty"):
        load_pairs(path)


def test_load_pairs_non_string(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"en": 5, "du": "b"}'])
    with pytest.raises(DataError, match="'en' must be a string"):
        load_pairs(path)


def test_load_pairs_empty_file_and_missing_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no pairs"):
        load_pairs(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_pairs(tmp_path / "nope.jsonl")


def test_load_pairs_invalid_utf8_names_line_and_byte_offset(tmp_path):
    good = '{"en": "Hello", "du": "Hallo"}\r\n'.encode()
    bad = '{"en": "Gr'.encode() + b"\xfc" + '\u00df", "du": "Gr\u00fc\u00df"}\n'.encode()  # latin-1 in a UTF-8 file
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + bad)
    with pytest.raises(DataError) as exc:
        load_pairs(path)
    msg = str(exc.value)
    assert f"{path}:3: not valid UTF-8" in msg and "0xfc" in msg
    assert f"byte offset {len(good) + 1 + bad.index(0xfc)}" in msg
    path.write_bytes(good + bad)
    assert load_pairs(path, limit=1)[0].target == "Hallo"  # lines past the limit are not read


def test_parallel_invalid_utf8_names_line(tmp_path):
    src = write_lines(tmp_path / "en.txt", ["one", "two"])
    tgt = tmp_path / "de.txt"
    tgt.write_bytes(b"eins\nzw\xe4i\n")
    with pytest.raises(DataError, match=r"de\.txt:2: not valid UTF-8 \(byte 0xe4 at byte offset 7"):
        parallel_to_jsonl(src, tgt, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


# --- parallel_to_jsonl -------------------------------------------------------------------------

def test_parallel_round_trip(tmp_path):
    src = write_lines(tmp_path / "en.txt", ["Hello world.", 'He said "hi" / \\ ok'])
    tgt = write_lines(tmp_path / "de.txt", ["Hallo Welt.", "Er sagte „hallo“ – ok"])
    out = tmp_path / "out.jsonl"
    assert parallel_to_jsonl(src, tgt, out) == 2
    assert "„hallo“" in out.read_text(encoding="utf-8")  # ensure_ascii=False
    assert load_pairs(out) == [Pair(0, "Hello world.", "Hallo Welt."),
                               Pair(1, 'He said "hi" / \\ ok', "Er sagte „hallo“ – ok")]
    assert not os.path.exists(str(out) + ".tmp")


def test_parallel_mismatched_counts_leaves_nothing(tmp_path):
    src = write_lines(tmp_path / "en.txt", ["a", "b", "c"])
    tgt = write_lines(tmp_path / "de.txt", ["x", "y"])
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError) as exc:
        parallel_to_jsonl(src, tgt, out)
    assert "3" in str(exc.value) and "2" in str(exc.value)
    assert not out.exists() and not os.path.exists(str(out) + ".tmp")


def test_parallel_empty_line_named(tmp_path):
    src = write_lines(tmp_path / "en.txt", ["a", "b"])
    tgt = write_lines(tmp_path / "de.txt", ["x", ""])
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=r"de\.txt:2: empty line"):
        parallel_to_jsonl(src, tgt, out)
    assert not out.exists()


# --- tokenization ------------------------------------------------------------------------------

def test_use_chat_template(tok):
    assert use_chat_template(tok, "auto") is True
    assert use_chat_template(tok, "raw") is False
    assert use_chat_template(tok, "chat") is True
    plain = make_tokenizer(chat_template=None)
    assert use_chat_template(plain, "auto") is False
    with pytest.raises(ConfigError, match="chat_template"):
        use_chat_template(plain, "chat")
    with pytest.raises(ConfigError, match="prompt_format"):
        use_chat_template(tok, "fancy")


def test_chat_prompt_ids_match_rendered_text(tok):
    ids = prompt_ids(tok, "Hello world", chat=True)
    rendered = "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    v = tok.get_vocab()
    assert ids == [v["<|im_start|>"], v["user"], v["\n"], v["Hello"], v["world"], v["<|im_end|>"],
                   v["\n"], v["<|im_start|>"], v["assistant"], v["\n"]]


def test_raw_prompt_ids_add_special_tokens(tok):
    v = tok.get_vocab()
    assert prompt_ids(tok, "Hello world", chat=False) == [v["<s>"], v["Hello"], v["world"]]


def test_stop_and_target_ids(tok):
    v = tok.get_vocab()
    assert stop_token_id(tok, chat=True) == v["<|im_end|>"]
    assert stop_token_id(tok, chat=False) == v["\n"]
    assert target_ids(tok, "Hallo Welt", chat=True) == [v["Hallo"], v["Welt"], v["<|im_end|>"]]
    assert target_ids(tok, "Hallo Welt", chat=False) == [v["Hallo"], v["Welt"], v["\n"]]
    with pytest.raises(DataError, match="no tokens"):
        target_ids(tok, "", chat=True)
    assert source_token_count(tok, "Hello world Hello") == 3


def test_tokenizer_hash_stable_and_sensitive(tok):
    h = tokenizer_hash(tok)
    assert len(h) == 64 and h == tokenizer_hash(tok) == tokenizer_hash(make_tokenizer())
    assert tokenizer_hash(make_tokenizer(chat_template=CHAT_TEMPLATE + " ")) != h
    assert tokenizer_hash(make_tokenizer(chat_template=None)) != h


def test_parallel_to_jsonl_cli(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    job = Path(__file__).resolve().parents[1] / "jobs" / "parallel_to_jsonl.py"
    (tmp_path / "a.en").write_text("Hello.\nGood day.\n")
    (tmp_path / "a.de").write_text("Hallo.\nGuten Tag.\n")
    ok = subprocess.run([sys.executable, str(job), str(tmp_path / "a.en"), str(tmp_path / "a.de"),
                         str(tmp_path / "out.jsonl")], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "wrote 2 pairs" in ok.stdout
    assert [p.target for p in load_pairs(tmp_path / "out.jsonl")] == ["Hallo.", "Guten Tag."]
    (tmp_path / "b.de").write_text("Hallo.\n")
    bad = subprocess.run([sys.executable, str(job), str(tmp_path / "a.en"), str(tmp_path / "b.de"),
                          str(tmp_path / "bad.jsonl")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and not (tmp_path / "bad.jsonl").exists()


def test_a_field_of_invisible_characters_is_empty(tmp_path):
    from pema.errors import DataError
    from pema.formats.tasks import load_pairs

    path = tmp_path / "zw.jsonl"
    path.write_text('{"en": "A cat.", "du": "Eine Katze."}\n{"en": "A dog.", "du": "\\u200b\\u200d \\u2060"}\n',
                    encoding="utf-8")
    with pytest.raises(DataError, match=r"zw\.jsonl:2: field 'du' is empty: .*U\+200B"):
        load_pairs(path)
    path.write_text('{"en": "A cat.", "du": "Eine\\u00adKatze \\u200b."}\n', encoding="utf-8")
    assert load_pairs(path)[0].target == "Eine\u00adKatze \u200b."  # visible text with a soft hyphen stays as it is
