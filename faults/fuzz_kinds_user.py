"""The kinds that came from what users did (issue 21): a text over ``data.max_tokens``, a field of invisible
characters only, an output folder that cannot be written, and a folder another job holds. Each is its own kind, so
that the fixes stay fixed; the harness arranges the read-only folder and the holding process (``Case.setup``,
:mod:`faults.fuzz_setup`)."""
from __future__ import annotations

import json
import re

from faults.fuzz_base import DATA_JOBS, WORDS, Case, at_line, job_args, jsonl, kind, with_defect

FIELDS = ("en", "du")
SIDES = {"en": "source", "du": "target"}
# a valid line of the fuzzer has at most 36 tokens (8 of WORDS, measured with tiny://llama's tokenizer): a cap from
# here leaves every base file under it
CAPS = (48, 64, 96)
# whitespace, format (Cf) and control characters: nothing that shows
INVISIBLE = ("\u200b", "\u200b\u200c\u200d", "\ufeff", "\u2060\u2060", "\u00ad", " \u200b ", "\u200e\u200f",
             "\u180e", "\t\u200b\n", "\u2061\u2062\u2063", "\u00a0\u200d\u3000")


def _line(rng, fld: str, text: str, ascii_escapes: bool | None = None) -> bytes:
    other = "a" if fld == "du" else "b"
    obj = {"en": text, "du": other} if fld == "en" else {"en": other, "du": text}
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5 if ascii_escapes is None else ascii_escapes).encode()


def _words(rng, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


@kind("jsonl", "overlength_text", DATA_JOBS)
def _overlength(rng, job, out):
    """A source or target over a lowered data.max_tokens (every word is at least one token): a named error at its
    line; with data.overlength=truncate the same file is accepted (the text is cut and counted)."""
    cap, fld = rng.choice(CAPS), rng.choice(FIELDS)
    n_words = rng.randint(cap + 1, 3 * cap)
    data, n = with_defect(rng, _line(rng, fld, _words(rng, n_words)))
    truncate = rng.random() < 0.2
    case = jsonl(rng, job, out, data, f"line {n}: the {SIDES[fld]} has {n_words} words, data.max_tokens={cap}"
                 + (", data.overlength=truncate: accepted" if truncate else ""), n,
                 expect="accept" if truncate else "error",
                 names=[] if truncate else [at_line("@IN@/bad.jsonl", n), re.escape(f"field '{fld}'"),
                                           re.escape(f"data.max_tokens={cap}")])
    case.args += [f"data.max_tokens={cap}"] + (["data.overlength=truncate"] if truncate else [])
    return case


@kind("jsonl", "overlength_1mb", DATA_JOBS, heavy=True)
def _overlength_1mb(rng, job, out):
    """A sentence of about 1 MB (under the 1 Mi-character line limit, about 300,000 tokens) at the default cap of 512
    tokens: the decoding used to try to allocate 46 GB for its causal mask; now it is refused at the job's edge."""
    fld = rng.choice(FIELDS)
    text = _words(rng, 160_000)[:1_000_000]
    data, n = with_defect(rng, _line(rng, fld, text, ascii_escapes=False))  # escapes would pass the line limit
    return jsonl(rng, job, out, lambda: data, f"line {n}: a 1 MB {SIDES[fld]}", n,
                 names=[at_line("@IN@/bad.jsonl", n), re.escape(f"field '{fld}'"), "data.max_tokens=512"])


@kind("jsonl", "invisible_only_field", DATA_JOBS)
def _invisible(rng, job, out):
    """A field made only of zero-width spaces, joiners, BOMs, soft hyphens or direction marks (maybe with spaces):
    refused as empty, naming the line, as an empty field is."""
    fld, text = rng.choice(FIELDS), rng.choice(INVISIBLE)
    data, n = with_defect(rng, _line(rng, fld, text))
    return jsonl(rng, job, out, data, f"line {n}: {fld} = {text!r}", n,
                 names=[at_line("@IN@/bad.jsonl", n), re.escape(f"field '{fld}'"), "invisible"])


@kind("cli", "output_dir_read_only")
def _read_only(rng, job, out):
    """--output-dir that cannot be written: the folder itself (when it exists) or the folder it would be made in.
    Refused naming the path, before Ray starts. The harness makes the folder read-only: mode 0o555, or for root
    (whom modes do not stop) the immutable attribute (chattr +i)."""
    if out != "absent" and rng.random() < 0.6:
        return Case("cli", "", job, "--output-dir is a read-only folder", job_args(job), [re.escape("@OUT@")],
                    setup="read_only")
    depth = rng.choice(("run", "run/deeper"))
    path = f"@IN@/ro/{depth}"
    return Case("cli", "", job, f"--output-dir {depth} under a read-only folder", job_args(job, out=path),
                [re.escape(path), re.escape("@IN@/ro")], setup="read_only_parent")


@kind("cli", "folder_held")
def _held(rng, job, out):
    """Another live process holds the output folder's lock: exit 2, naming its pid (and host), nothing written."""
    return Case("cli", "", job, "another process holds --output-dir", job_args(job),
                [re.escape("@OUT@"), "another job holds it", r"pid @HOLDER@(?!\d)"], setup="holder")
