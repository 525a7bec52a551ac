"""The kinds of hostile input (registered in :data:`faults.fuzz_base.KINDS`): each draws one case from the seed."""
from __future__ import annotations

import dataclasses
import json
import re
import typing

from faults.fuzz_base import (BOM, DATA_JOBS, DIR, LOOP, Case, at_line, base_config, bomb, config_text, config_value, dump,
                              job_args, jsonl, key_re, kind, reads, valid_line, with_defect)

# ----------------------------------------------------------------------------------------------------- JSONL

MALFORMED = (b'{"en": "a", "du": "b"', b'{"en": "a" "du": "b"}', b"{'en': 'a', 'du': 'b'}", b"en=a du=b",
             b'{"en": "a", "du": "b"} trailing', b'{"en": "a", "du": "b",}', b"[", b"}", b'{"en": "a\\x", "du": "b"}',
             b'{"en": "a", "du": "b"}{"en": "c", "du": "d"}', b'{"en": "unterminated, "du": "b"}', b"\x1b[31m")
NOT_OBJECT = (b"[1, 2]", b'"text"', b"42", b"null", b"true", b'[{"en": "a", "du": "b"}]')
WRONG = (1, 2.5, ["a", "b"], None, {"text": "a"}, True, [])
EMPTY = ("", " ", "\t\n", "\u3000", "   \u00a0 ")
BAD_UTF8 = (b"\xff", b"\xc3(", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"Gr\xfc\xdfe",
            b"\xfe\xff")
NUL = (b'{"en": "a\x00b", "du": "c"}', b"\x00\x00\x00", b'{"en": "a", "du": "b"}\x00',
       b"\x00" + b'{"en": "a", "du": "b"}')
FIELDS = ("en", "du")


def _obj(**fields) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode()


def _one_bad_line(name: str, defects: tuple):
    """A JSONL kind: valid lines with one line replaced by one of ``defects``."""
    @kind("jsonl", name, DATA_JOBS)
    def make(rng, job, out):
        defect = rng.choice(defects)
        data, n = with_defect(rng, defect)
        return jsonl(rng, job, out, data, f"line {n} is {defect[:40]!r}", n)
    return make


_malformed = _one_bad_line("malformed_json", MALFORMED)
_not_object = _one_bad_line("not_an_object", NOT_OBJECT)


@kind("jsonl", "missing_field", DATA_JOBS)
def _missing(rng, job, out):
    present = rng.choice(({"en": "a"}, {"du": "b"}, {}, {"EN": "a", "DU": "b"}, {"source": "a", "target": "b"}))
    data, n = with_defect(rng, _obj(**present))
    return jsonl(rng, job, out, data, f"line {n} has only {sorted(present)}", n)


@kind("jsonl", "wrong_type", DATA_JOBS)
def _wrong_type(rng, job, out):
    fld, value = rng.choice(FIELDS), rng.choice(WRONG)
    data, n = with_defect(rng, _obj(**{"en": "a", "du": "b", fld: value}))
    return jsonl(rng, job, out, data, f"line {n}: {fld} = {value!r}", n)


@kind("jsonl", "empty_text", DATA_JOBS)
def _empty(rng, job, out):
    fld, value = rng.choice(FIELDS), rng.choice(EMPTY)
    data, n = with_defect(rng, _obj(**{"en": "a", "du": "b", fld: value}))
    return jsonl(rng, job, out, data, f"line {n}: {fld} = {value!r}", n)


@kind("jsonl", "invalid_utf8", DATA_JOBS)
def _utf8(rng, job, out):
    bad = rng.choice(BAD_UTF8)
    line = valid_line(rng)
    cut = rng.randrange(len(line) + 1)
    data, n = with_defect(rng, line[:cut] + bad + line[cut:])
    return jsonl(rng, job, out, data, f"line {n}: {bad!r} at byte {cut}", n, names=[at_line("@IN@/bad.jsonl", n),
                                                                                    "not valid UTF-8"])


_nul = _one_bad_line("nul_bytes", NUL)


@kind("jsonl", "bom_then_defect", DATA_JOBS)
def _bom_defect(rng, job, out):
    # a leading BOM is accepted (line 1 is read as if it were not there); the error is the defect's, on its line
    defect = rng.choice(MALFORMED + NOT_OBJECT + (BOM + valid_line(rng), _obj(en="a")))
    lines, n = with_defect(rng, defect)
    data = BOM + valid_line(rng) + b"\n" + lines
    return jsonl(rng, job, out, data, f"leading BOM, line {n + 1} is {defect[:40]!r}", n + 1)


@kind("jsonl", "bom_valid", DATA_JOBS)
def _bom_valid(rng, job, out):
    data = BOM + b"\n".join(rng.choice((b"", valid_line(rng))) if i else valid_line(rng) for i in range(6)) + b"\n"
    return jsonl(rng, job, out, data, "a UTF-8 BOM, then valid lines: accepted as standard", None, expect="accept",
                 names=[])


@kind("jsonl", "deep_nesting", DATA_JOBS)
def _deep(rng, job, out):
    depth = rng.choice((10_000, 100_000))
    defect = rng.choice((b"[" * depth + b"]" * depth, b'{"en": ' + b"[" * depth + b"]" * depth + b', "du": "b"}'))
    data, n = with_defect(rng, defect)
    return jsonl(rng, job, out, data, f"line {n} nests {depth} arrays", n)


@kind("jsonl", "huge_number", DATA_JOBS)
def _huge(rng, job, out):
    digits = rng.choice((5_000, 50_000))
    data, n = with_defect(rng, b'{"en": 1' + b"0" * digits + b', "du": "b"}')
    return jsonl(rng, job, out, data, f"line {n} holds a {digits}-digit integer", n)


@kind("jsonl", "lone_surrogate", DATA_JOBS)
def _surrogate(rng, job, out):
    esc = rng.choice((b"\\ud800", b"\\udfff", b"\\udc80x"))
    data, n = with_defect(rng, b'{"en": "a' + esc + b'b", "du": "c"}')
    return jsonl(rng, job, out, data, f"line {n} escapes an unpaired surrogate {esc!r}", n)


@kind("jsonl", "line_10mb", DATA_JOBS, heavy=True)
def _long(rng, job, out):
    size = 10 * 1024 * 1024
    variant = rng.choice(("text", "garbage", "whitespace"))
    defect = {"text": b'{"en": "' + b"a" * size + b'", "du": "b"}', "garbage": b"x" * size,
              "whitespace": b" " * size + b'{"en": "a", "du": "b"}'}[variant]
    data, n = with_defect(rng, defect)
    return jsonl(rng, job, out, lambda: data, f"line {n}: a 10 MiB line ({variant})", n)


@kind("jsonl", "million_lines", DATA_JOBS, heavy=True)
def _million(rng, job, out):
    variant = rng.choice(("bad_last", "utf8_last", "blank"))
    short = b'{"en":"a","du":"b"}\n'
    make = {"bad_last": lambda: short * 999_999 + b'{"en":"a"}\n',
            "utf8_last": lambda: short * 999_999 + b'{"en":"\xff","du":"b"}\n',
            "blank": lambda: b"\n" * 1_000_000}[variant]
    lineno = None if variant == "blank" else 1_000_000
    return jsonl(rng, job, out, make, f"10^6 short lines ({variant})", lineno)


@kind("jsonl", "empty_file", DATA_JOBS)
def _empty_file(rng, job, out):
    data = rng.choice((b"", b"\n\n\n", b"   \n\t\n", b"\r\n", BOM))
    return jsonl(rng, job, out, data, f"the file is {data!r}", None)


@kind("jsonl", "directory", DATA_JOBS)
def _directory(rng, job, out):
    return jsonl(rng, job, out, DIR, "a folder instead of a file", None)


@kind("jsonl", "special_file", DATA_JOBS)
def _special(rng, job, out):
    which = rng.choice(("/dev/zero", "/dev/null", "loop"))
    if which == "loop":
        return jsonl(rng, job, out, LOOP, "a symbolic link to itself", None)
    split = rng.choice(reads(job, out))
    names = [at_line(which, 1) if which == "/dev/zero" else re.escape(which)]
    return Case("jsonl", "", job, f"--{split} {which}", job_args(job) + [f"--{split}", which], names)


@kind("jsonl", "missing_file", DATA_JOBS)
def _missing_file(rng, job, out):
    return jsonl(rng, job, out, None, "no such file", None, name=rng.choice(("missing.jsonl", "no/such/dir/x.jsonl")))


# ---------------------------------------------------------------------------------------------------- configs


def _fields() -> list[tuple[str, object]]:
    from pema.config import PipelineConfig

    found = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
            else:
                found.append((f"{prefix}{f.name}", hint))
    walk(PipelineConfig, "")
    return found


FIELD_HINTS = _fields()
SECTIONS = ("model", "data", "memory", "adapter", "train", "decode", "decode.const", "decode.gu", "decode.pema", "eval",
            "knn", "lora", "resources")
SCHEDULE = {"kind": ["cosine", ""], "lam": [1.5, -0.1], "lam_max": [1.5, -1], "floor": [-0.5, 2.0], "stop_lam": [1.1]}
OUT_OF_RANGE = {
    "model.model_id": [""], "model.dtype": ["float64", "int8"], "model.prompt_format": ["jinja"],
    "data.train_limit": [0, -1], "data.dev_limit": [0], "data.test_limit": [-5], "data.source_field": ["", "  "],
    "data.target_field": [""], "data.template": ["no placeholder here", "{bogus}", "{en} {du}", "{en"],
    "data.train": [""], "memory.dtype": ["bfloat16"], "memory.rows_per_part": [0, -5], "memory.batch_tokens": [0],
    "adapter.rank": [0, -16], "adapter.alpha": [0, -1.0], "adapter.dropout": [1.0, -0.1],
    "train.method": ["sgd"], "train.rct_epochs": [-1], "train.rct_lr": [0, -0.1], "train.epochs": [-2],
    "train.lr": [0.0, -0.5], "train.batch_size": [0], "train.kappa": [1.5, -0.1], "train.phase2_init_A": ["keep"],
    "train.b_pd_init": ["ones"], "train.pd_vocab": ["half"], "train.weight_decay": [-0.1], "train.rct_solver": ["adam"],
    "train.pd_objective": ["ce"], "train.mixture_lam": [0.0, 1.5], "train.evals_per_epoch": [0],
    "train.max_failures": [-2], "decode.strategy": ["nucleus"], "decode.num_beams": [0], "decode.temperature": [0],
    "decode.top_p": [0, 1.5], "decode.max_new_tokens": [0], "decode.batch_size": [-1],
    "decode.no_repeat_ngram_size": [-1], "decode.repetition_penalty": [0], "decode.length_cap": [0, 101],
    "knn.k": [0], "knn.temperature": [0], "knn.lam": [1.5], "knn.index": ["hnsw"], "knn.nlist": [0], "knn.pq_m": [0],
    "lora.rank": [0], "lora.alpha": [0], "lora.dropout": [1.0], "lora.target_modules": [[""], []],
    "lora.epochs": [0], "lora.lr": [0], "resources.device": ["gpu", "tpu", "cuda:x", "cudaa", ""],
    "resources.memory_actors": [-1], "resources.gpus_per_actor": [0], "resources.cpus_per_actor": [0, -1.0],
    "resources.train_workers": [0], "resources.eval_cpus": [0], "resources.owner_url": ["ftp://x", "localhost:8000"],
    "resources.owner_token_env": [""],
    **{f"decode.{s}.{k}": v for s in ("const", "gu", "pema") for k, v in SCHEDULE.items()}}


def wrong_values(hint) -> list:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    if typing.get_origin(base) is tuple:
        values = [5, "q_proj", [1, 2], {"x": 1}, True, [["q_proj"]]]
    else:
        values = {int: [True, False, "3", [3], 3.5, {"x": 1}], float: [True, "0.5", [0.5], {"x": 1}],
                  bool: [1, 0, "true", [True], {"x": 1}], str: [5, True, ["a"], {"x": "y"}, 2.5]}[base]
    return values if optional else values + [None]


@kind("config", "unknown_key")
def _unknown_top(rng, job, out):
    key = rng.choice(("modle", "trian", "bogus", "Train", "datas", "resource", "decoding", "memory_"))
    return config_value(rng, job, key, rng.choice((1, {"x": 1}, "a")), "an unknown top-level key")


@kind("config", "unknown_nested_key")
def _unknown_nested(rng, job, out):
    key = rng.choice([f"{s}.{n}" for s in SECTIONS for n in ("kapa", "Rank", "bogus", "lr_")] +
                     ["model.device", "train.num_workers", "memory.num_actors", "decode.gu.lam_min"])
    return config_value(rng, job, key, rng.choice((1, 0.5, "x", True)), "an unknown nested key")


@kind("config", "wrong_type")
def _wrong_type_cfg(rng, job, out):
    key, hint = rng.choice(FIELD_HINTS)
    return config_value(rng, job, key, rng.choice(wrong_values(hint)), f"wrong type for {hint}")


@kind("config", "out_of_range")
def _range(rng, job, out):
    key = rng.choice(sorted(OUT_OF_RANGE))
    return config_value(rng, job, key, rng.choice(OUT_OF_RANGE[key]), "out of range")


@kind("config", "non_finite")
def _non_finite(rng, job, out):
    key = rng.choice([k for k, h in FIELD_HINTS if h is float or float in typing.get_args(h)])
    return config_value(rng, job, key, rng.choice((float("inf"), float("-inf"), float("nan"))), "not finite")


@kind("config", "section_not_a_mapping")
def _section(rng, job, out):
    return config_value(rng, job, rng.choice(SECTIONS), rng.choice((5, "text", [1, 2], True)), "a section as a value")


@kind("config", "value_as_section")
def _value_section(rng, job, out):
    key, _ = rng.choice(FIELD_HINTS)
    sub = rng.choice(("x", "value", "inner.deep"))
    return config_value(rng, job, f"{key}.{sub}", 1, "a value used as a section",
                        names=[key_re(f"{key}.{sub}")])


@kind("config", "alias_bomb")
def _bomb(rng, job, out):
    key = rng.choice(("model.model_id", "lora.target_modules", "train.kappa", "bogus", "data.train", "decode.gu.lam"))
    text = bomb(mapping=rng.random() < 0.3)
    if rng.random() < 0.5:
        *parents, leaf = key.split(".")
        doc = "".join(f"{'  ' * i}{p}:\n" for i, p in enumerate(parents)) + f"{'  ' * len(parents)}{leaf}: {text}\n"
        return config_text(job, doc.encode(), f"a billion-laughs alias chain at {key} in the YAML file")
    return Case("config", "", job, f"a billion-laughs alias chain in the override {key}=...",
                job_args(job) + [f"{key}={text}"], [key_re(key)])


@kind("config", "recursive_alias")
def _recursive(rng, job, out):
    doc = rng.choice(("model: {model_id: &r [*r]}\n", "train: &t {kappa: 0.2, epochs: *t}\n",
                      "lora:\n  target_modules: &m [q_proj, *m]\n", "&top {model: *top}\n"))
    return config_text(job, doc.encode(), f"a recursive alias: {doc.strip()!r}")


@kind("config", "not_a_mapping")
def _not_mapping(rng, job, out):
    doc = rng.choice(("- model\n- data\n", "just a sentence\n", "42\n", "[1, 2]\n", "'quoted'\n", "true\n"))
    return config_text(job, doc.encode(), f"the document is {doc.strip()!r}", names=[re.escape("@IN@/cfg.yaml")])


SYNTAX = ("model: [tiny\n", "model:\n  model_id: tiny://llama\n bad_indent: 1\n", "\tmodel: {}\n", "a: b: c\n",
          "model: {model_id: x\n", "model:\n  model_id: 'unterminated\n", "%BAD directive\n",
          "model: {}\n---\ndata: {}\n", "model: *undefined\n", "train:\n  kappa: !!float abc\n",
          "train:\n  epochs: !!int x\n", "model: !!binary zz\n", "train: !!python/object:os.system {}\n", "{[1]: 2}\n",
          "model: @x\n", "data: {train: `x`}\n")


@kind("config", "invalid_yaml")
def _syntax(rng, job, out):
    doc = rng.choice(SYNTAX)
    return config_text(job, dump(base_config()) + doc.encode(), f"the YAML file ends with {doc!r}")


@kind("config", "non_utf8_config")
def _non_utf8(rng, job, out):
    lines = dump(base_config()).splitlines(keepends=True)
    at = rng.randrange(len(lines) + 1)
    bad = rng.choice((b"# Gr\xfc\xdfe\n", b"# \xff\xfe\n", b"bogus: caf\xe9\n"))
    text = b"".join(lines[:at]) + bad + b"".join(lines[at:])
    return config_text(job, text, f"line {at + 1} is {bad!r}", names=[at_line("@IN@/cfg.yaml", at + 1)])


@kind("config", "nul_in_config")
def _nul_cfg(rng, job, out):
    lines = dump(base_config()).splitlines(keepends=True)
    at = rng.randrange(len(lines))
    text = b"".join(lines[:at]) + lines[at].rstrip(b"\n") + b"\x00\n" + b"".join(lines[at + 1:])
    return config_text(job, text, f"a NUL byte on line {at + 1}", names=[at_line("@IN@/cfg.yaml", at + 1)])


@kind("config", "duplicate_key")
def _duplicate(rng, job, out):
    tail = rng.choice((b"train:\n  epochs: 3\n", b"model:\n  model_id: tiny://gpt2\n"))
    text = dump(base_config()) + tail
    nested = rng.random() < 0.5
    if nested:  # the same key twice inside one section
        text = dump(base_config()).replace(b"  rank: 16\n", b"  rank: 16\n  rank: 32\n")
    key = "adapter.rank" if nested else tail.split(b":")[0].decode()
    return config_text(job, text, f"{key} twice", names=[at_line("@IN@/cfg.yaml"), key_re(key)])


@kind("config", "non_string_key")
def _nonstring_key(rng, job, out):
    doc = rng.choice(("1: x\n", "null: x\n", "true: 1\n", "train:\n  3: x\n", "1.5: a\nbogus: b\n", "[a]: 1\n"))
    return config_text(job, dump(base_config()) + doc.encode(), f"a key that is not a string: {doc.strip()!r}",
                       names=[re.escape("@IN@/cfg.yaml")] if doc.startswith("[") else None)


@kind("config", "deep_yaml")
def _deep_yaml(rng, job, out):
    depth = rng.choice((2_000, 20_000))
    open_, close = rng.choice((("[", "]"), ("{a: ", "}")))
    doc = "model: " + open_ * depth + "1" + close * depth + "\n"
    return config_text(job, doc.encode(), f"{depth} nested {open_!r}", names=[re.escape("@IN@/cfg.yaml")])


@kind("config", "bom_config_valid")
def _bom_cfg(rng, job, out):
    return config_text(job, BOM + dump(base_config()), "a UTF-8 BOM before a valid config: accepted", names=[],
                       expect="accept")


@kind("config", "config_missing")
def _cfg_missing(rng, job, out):
    path = rng.choice(("@IN@/nope.yaml", "@IN@/no/such/dir/cfg.yaml"))
    return Case("config", "", job, f"--config {path} does not exist", job_args(job, path), [re.escape(path)])


@kind("config", "config_special")
def _cfg_special(rng, job, out):
    which = rng.choice(("/dev/zero", "loop", "jsonl"))
    path = {"/dev/zero": "/dev/zero", "loop": "@IN@/loop.yaml", "jsonl": "@IN@/train.jsonl"}[which]
    return Case("config", "", job, f"--config {which}", job_args(job, path), [re.escape(path)],
                {"loop.yaml": LOOP} if which == "loop" else {})


@kind("config", "yaml_typed_value")
def _typed(rng, job, out):
    key, _ = rng.choice(FIELD_HINTS)
    raw = rng.choice(("2024-01-01", "!!set {a: null}", "!!binary aGVsbG8=", "!!timestamp 2001-12-14", "[!!binary aGk=]",
                      "!!omap [{a: 1}]", "2001-12-14t21:59:43.10-05:00"))
    return Case("config", "", job, f"override {key}={raw} (a YAML type no field takes)", job_args(job) + [f"{key}={raw}"],
                [key_re(key)])


@kind("config", "config_directory")
def _cfg_dir(rng, job, out):
    return Case("config", "", job, "--config is a folder", job_args(job, "@IN@/cfgdir"), [re.escape("@IN@/cfgdir")],
                {"cfgdir": DIR})
