"""Task data and prompt formatting: templates, JSONL pairs, and the tokenization contract.

The prompt templates are the PEMA seed's (WMT22 En->De translation and GYAFC formality transfer).
Tokenization lives here so that the memory builder, adapter training and generation all tokenize
the prompt and the target in exactly the same way.  Tokenizers are duck-typed (any object with the
Hugging Face ``__call__`` / ``get_vocab`` / ``apply_chat_template`` interface works).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from pema.errors import ConfigError, DataError, named_open_errors

TEMPLATES: dict[str, str] = {
    "wmt22_en_de": "Translate this from English to German: \n{en}\nGerman: ",
    "gyafc": "Convert the following informal sentence into a formal sentence: \nInformal: {informal}\nFormal: ",
}

PROMPT_FORMATS = ("auto", "chat", "raw")
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass(frozen=True)
class Pair:
    """One source/target example; ``index`` is its 0-based position among the non-blank lines."""

    index: int
    source: str
    target: str


def _placeholders(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"template {template!r} is not a valid format string ({exc})") from None


def resolve_template(name_or_text: str) -> str:
    """Return the named template from TEMPLATES, or ``name_or_text`` itself if it has a placeholder."""
    if name_or_text in TEMPLATES:
        return TEMPLATES[name_or_text]
    if isinstance(name_or_text, str) and "{" in name_or_text and _placeholders(name_or_text):
        return name_or_text
    raise ConfigError(
        f"template {name_or_text!r} is neither a known template name ({', '.join(sorted(TEMPLATES))}) "
        "nor a custom template with a '{field}' placeholder; use one of those names or add the placeholder"
    )


def render_instruction(template: str, source: str, *, source_field: str) -> str:
    """Fill ``template``'s single ``{source_field}`` placeholder with ``source``."""
    fields = _placeholders(template)
    if source_field not in fields:
        raise ConfigError(
            f"template {template!r} has no '{{{source_field}}}' placeholder (source_field={source_field!r}); "
            "add it or change source_field"
        )
    others = sorted({f for f in fields if f != source_field})
    if others:
        raise ConfigError(
            f"template {template!r} has placeholders {others} besides '{{{source_field}}}'; "
            "a template may only use the source field"
        )
    return template.format(**{source_field: source})


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8
_SURROGATE = re.compile("[\ud800-\udfff]")  # in a decoded JSON string: an unpaired "\ud800" escape, not text
MAX_LINE_CHARS = 1 << 20  # a longer line is refused: no example is that long, and a line is read whole


def _visible(text: str) -> bool:
    """Whether ``text`` has a character that shows: not whitespace, not a format or control character (zero-width
    spaces and joiners, word joiners, BOMs, soft hyphens)."""
    return any(not c.isspace() and unicodedata.category(c) not in ("Cf", "Cc") for c in text)


def _open_text(path: Path):
    with named_open_errors(path, DataError, "a JSONL file"):
        return open(path, encoding="utf-8", errors="surrogateescape", newline="")


def _text_lines(path: Path):
    """``(lineno, line)`` of a UTF-8 text file, lazily, in bounded memory; a line that is not valid UTF-8 raises
    DataError naming ``<path>:<lineno>``, the byte offset in the file and the byte, and so does a line of more than
    MAX_LINE_CHARS characters. A leading BOM is skipped. Lines split as in text mode (universal newlines)."""
    offset = 0  # bytes before the current line: newline="" keeps "\r\n" so every byte is counted
    with _open_text(path) as fh:
        lineno = 0
        while line := fh.readline(MAX_LINE_CHARS + 1):
            lineno += 1
            if len(line) > MAX_LINE_CHARS:
                raise DataError(f"{path}:{lineno}: a line of more than {MAX_LINE_CHARS:,} characters; one line "
                                "holds one example (is this a JSONL file?)")
            if lineno == 1 and line.startswith("\ufeff"):  # a UTF-8 BOM: standard, if not needed
                line, offset = line[1:], 3
            if bad := _UNDECODABLE.search(line):
                head = line[:bad.start()].encode("utf-8", "surrogateescape")
                byte = ord(bad.group()) - 0xDC00
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{byte:02x} at byte offset "
                                f"{offset + len(head)} of the file, column {bad.start() + 1}); save the file as UTF-8")
            offset += len(line.encode("utf-8", "surrogateescape"))
            yield lineno, line


def load_pairs(
    path, *, source_field: str = "en", target_field: str = "du", limit: int | None = None, cap=None
) -> list[Pair]:
    """Read a JSONL file of ``{source_field: ..., target_field: ...}`` objects into Pairs.

    Blank lines are skipped; ``limit`` keeps the first N pairs.  Any malformed line (bad JSON or UTF-8, a missing
    or empty field, a line over MAX_LINE_CHARS) raises DataError naming ``<path>:<lineno>``, and so does a file
    without pairs; FileNotFoundError passes through. ``cap``: a :class:`TokenCap` for the texts' token length.
    """
    pairs = list(iter_pairs(path, source_field=source_field, target_field=target_field, limit=limit, cap=cap))
    if not pairs:
        raise _no_pairs(path, source_field, target_field)
    return pairs


def check_pairs(path, *, source_field: str = "en", target_field: str = "du", limit: int | None = None,
                cap=None) -> int:
    """:func:`load_pairs`' checks in constant memory (nothing is kept); returns the number of pairs."""
    n = sum(1 for _ in iter_pairs(path, source_field=source_field, target_field=target_field, limit=limit, cap=cap))
    if not n:
        raise _no_pairs(path, source_field, target_field)
    return n


def _no_pairs(path, source_field: str, target_field: str) -> DataError:
    return DataError(f"{path}: no pairs found (the file is empty or blank); expected JSONL lines "
                     f"with fields {source_field!r} and {target_field!r}")


def iter_pairs(path, *, source_field: str = "en", target_field: str = "du", limit: int | None = None,
               cap: "TokenCap | None" = None):
    """The Pairs of a JSONL file, lazily (see :func:`load_pairs`; an empty file yields nothing). With ``cap``, every
    source and target meets ``data.max_tokens`` (:class:`TokenCap`: an OverlengthError, or the text cut)."""
    if limit is not None and limit < 1:
        raise ConfigError(f"limit={limit!r} must be a positive integer or None")
    path = Path(path)
    n = 0
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                            "write one JSON object per line") from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: not valid here (JSON nested too deeply); write one flat JSON object "
                            "per line") from None
        except ValueError as exc:  # a number over Python's digit limit
            raise DataError(f"{path}:{lineno}: not valid here ({str(exc).split(';')[0]})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        texts = []
        for field in (source_field, target_field):
            if field not in obj:
                raise DataError(f"{path}:{lineno}: missing field {field!r} (fields present: "
                                f"{', '.join(sorted(obj)) or 'none'}); set source_field/target_field "
                                "to match the file or fix the line")
            value = obj[field]
            if not isinstance(value, str):
                raise DataError(f"{path}:{lineno}: field {field!r} must be a string, "
                                f"got {type(value).__name__}")
            if not value.strip():
                raise DataError(f"{path}:{lineno}: field {field!r} is empty; remove the line or fill it")
            if not _visible(value):
                shown = ", ".join(sorted({f"U+{ord(c):04X}" for c in value if not c.isspace()}))
                raise DataError(f"{path}:{lineno}: field {field!r} is empty: it holds only invisible characters "
                                f"({shown}); remove the line or fill it")
            if bad := _SURROGATE.search(value):
                raise DataError(f"{path}:{lineno}: field {field!r} holds an unpaired surrogate "
                                f"(\\u{ord(bad.group()):04x}), which is not text; fix the escape")
            texts.append(value if cap is None else cap.apply(value, f"{path}:{lineno}", len(texts), field))
        yield Pair(index=n, source=texts[0], target=texts[1])
        n += 1
        if limit is not None and n >= limit:
            return  # before the next line is read: what lies past the limit is never looked at


def _read_segments(path) -> list[str]:
    return [line.rstrip("\r\n") for _, line in _text_lines(Path(path))]


def parallel_to_jsonl(
    source_path, target_path, out_path, *, source_field: str = "en", target_field: str = "du"
) -> int:
    """Turn two line-aligned text files into JSONL (as the seed's parallel_corpus_to_json.py).

    Writes atomically via ``out_path + ".tmp"``; on any error no output file is left.  Returns the
    number of pairs written.
    """
    sources, targets = _read_segments(source_path), _read_segments(target_path)
    if len(sources) != len(targets):
        raise DataError(f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)}; "
                        "the files must be line-aligned")
    for lineno, (src, tgt) in enumerate(zip(sources, targets), start=1):
        for p, text in ((source_path, src), (target_path, tgt)):
            if not text.strip():
                raise DataError(f"{p}:{lineno}: empty line; every line must hold one segment "
                                "(remove the line from both files)")
    tmp = str(out_path) + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for src, tgt in zip(sources, targets):
                fh.write(json.dumps({source_field: src, target_field: tgt}, ensure_ascii=False) + "\n")
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(sources)


def use_chat_template(tokenizer, prompt_format: str) -> bool:
    """Decide whether prompts go through the tokenizer's chat template."""
    if prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"prompt_format {prompt_format!r} is unknown; use one of {', '.join(PROMPT_FORMATS)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return has_template
    if prompt_format == "chat" and not has_template:
        raise ConfigError("prompt_format 'chat' but the tokenizer has no chat_template; "
                          "use prompt_format 'raw' or 'auto'")
    return prompt_format == "chat"


def prompt_ids(tokenizer, instruction: str, *, chat: bool) -> list[int]:
    """Token ids of the prompt exactly as fed to the model at inference."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(instruction, add_special_tokens=True)["input_ids"])


def source_prompt_ids(tokenizer, template: str, source: str, *, source_field: str, chat: bool) -> list[int]:
    """The prompt for one source text, tokenized as both the memory build and generation use it."""
    return prompt_ids(tokenizer, render_instruction(template, source, source_field=source_field), chat=chat)


def stop_token_id(tokenizer, *, chat: bool) -> int:
    """The token that ends a target: end-of-turn in chat mode, a newline in raw mode."""
    if chat:
        vocab = tokenizer.get_vocab()
        for tok in END_OF_TURN_TOKENS:
            if tok in vocab:
                return int(vocab[tok])
        if getattr(tokenizer, "eos_token_id", None) is not None:
            return int(tokenizer.eos_token_id)
        raise ConfigError(f"tokenizer has none of the end-of-turn tokens {list(END_OF_TURN_TOKENS)} "
                          "and no eos_token_id; set an eos token or use prompt_format 'raw'")
    ids = list(tokenizer("\n", add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        raise ConfigError(f"raw prompt format needs '\\n' to be a single token, but it tokenizes to {ids}; "
                          "use prompt_format 'chat'")
    return int(ids[0])


def target_ids(tokenizer, target: str, *, chat: bool, stop_id: int | None = None) -> list[int]:
    """Token ids of ``target`` followed by the stop token (``stop_id``: a precomputed ``stop_token_id``, which
    costs a full vocabulary copy per call)."""
    ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise DataError(f"target {target!r} tokenizes to no tokens; remove the example")
    return ids + [stop_token_id(tokenizer, chat=chat) if stop_id is None else int(stop_id)]


def source_token_count(tokenizer, source: str) -> int:
    """Number of tokens in ``source`` without special tokens."""
    return len(tokenizer(source, add_special_tokens=False)["input_ids"])


OVERLENGTH = ("error", "truncate")  # data.overlength
PROMPT_MARGIN = 8  # tokens that may merge differently where a source meets its template's text


class OverlengthError(DataError):
    """A text over ``data.max_tokens`` (with ``data.overlength: error``), or a prompt or teacher-forced sequence over
    the bound that follows from it (:func:`prompt_token_bound`) where it is used."""


class TokenCap:
    """``data.max_tokens`` and ``data.overlength`` for the texts read from files (:func:`iter_pairs`).

    The rule: a text's length is the number of tokens the model's tokenizer makes of the text alone, without special
    tokens (:func:`source_token_count`): the source as written in the file, not the rendered prompt; the target
    without its stop token. Over ``max_tokens``, ``error`` raises an OverlengthError naming ``<path>:<line>``, and
    ``truncate`` cuts the text (:func:`cut_to_tokens`) and counts it in ``truncated``.

    Built with ``tokenizer``, it counts every text. Built with ``load`` (a function that returns the tokenizer), a
    text of b UTF-8 bytes with b + 1 <= max_tokens is under the cap without counting, and the tokenizer is loaded
    only for a longer text (seconds for a GGUF file, saved at a job's edge). That bound holds for the tokenizers
    the project loads: byte-level BPE (SmolLM2, GPT-2, Llama 3: every token covers at least one byte) and
    SentencePiece with byte fallback (Llama 2: the same, plus one dummy-prefix token); a character count is no bound
    (one CJK character is up to 3 tokens, an emoji up to 4). A tokenizer whose normalizer expands text (NFKC) can
    break it, which the stages catch: they count every text with the tokenizer they hold.
    """

    def __init__(self, max_tokens: int, overlength: str = "error", *, tokenizer=None, load=None):
        if overlength not in OVERLENGTH:
            raise ConfigError(f"data.overlength={overlength!r} is not one of {OVERLENGTH}")
        if (tokenizer is None) == (load is None):
            raise ValueError("TokenCap needs either tokenizer (count every text) or load (count past the byte bound)")
        self.max_tokens, self.overlength, self.exact = int(max_tokens), overlength, tokenizer is not None
        self._tok, self._load, self.truncated = tokenizer, load, 0

    def tokenizer(self):
        if self._tok is None:
            self._tok = self._load()
        return self._tok

    def count(self, text: str) -> int | None:
        """The tokens of ``text``; None when the byte bound puts it under the cap without counting."""
        if not self.exact and len(text.encode("utf-8", "surrogatepass")) + 1 <= self.max_tokens:
            return None
        return source_token_count(self.tokenizer(), text)

    def apply(self, text: str, where: str, side: int, field: str) -> str:
        """``text`` (side 0: the source, 1: the target, in ``field`` of ``where`` = ``<path>:<line>``) under the
        cap: as it is, cut, or an OverlengthError."""
        n = self.count(text)
        if n is None or n <= self.max_tokens:
            return text
        what = (f"{where}: the {('source', 'target')[side]} (field {field!r}) has {n:,} tokens, over "
                f"data.max_tokens={self.max_tokens}")
        if self.overlength == "error":
            raise OverlengthError(f"{what}; raise data.max_tokens, set data.overlength=truncate to cut such texts to "
                                  f"{self.max_tokens} tokens (counted in the output), or shorten the text")
        self.truncated += 1
        return cut_to_tokens(self.tokenizer(), text, self.max_tokens, what)


def cut_to_tokens(tokenizer, text: str, max_tokens: int, what: str = "a text") -> str:
    """The longest prefix of ``text`` that ends where one of its first ``max_tokens`` tokens ends and, trailing
    whitespace removed, has at most ``max_tokens`` tokens of its own (:func:`source_token_count`). A tokenizer
    without character offsets: the decoded first tokens instead. OverlengthError (``what``) when every such prefix
    is empty or invisible."""
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        candidates = (text[:end] for end in sorted({int(e) for _, e in offsets[:max_tokens]}, reverse=True))
    except (NotImplementedError, KeyError, TypeError, ValueError):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:max_tokens]
        candidates = (tokenizer.decode(ids[:k]) for k in range(len(ids), 0, -1))
    for cut in candidates:
        cut = cut.rstrip()
        if _visible(cut) and source_token_count(tokenizer, cut) <= max_tokens:
            return cut
    raise OverlengthError(f"{what}, and no prefix of it within {max_tokens} tokens is visible text; raise "
                          "data.max_tokens or shorten the text")


def context_window(model) -> int | None:
    """The longest sequence a model's config declares (``max_position_embeddings``, ``n_positions``), or None."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        if isinstance(n := getattr(config, name, None), int) and n > 0:
            return n
    return None


def prompt_token_bound(tokenizer, template: str, max_tokens: int, *, source_field: str, chat: bool) -> int:
    """The most tokens the prompt of a source within ``max_tokens`` may have: the prompt of an empty source, plus
    ``max_tokens``, plus :data:`PROMPT_MARGIN`. Decoding refuses a longer prompt, and the memory build a longer
    teacher-forced sequence (this bound plus ``max_tokens``), before anything sized by it is allocated."""
    empty = source_prompt_ids(tokenizer, template, "", source_field=source_field, chat=chat)
    return len(empty) + int(max_tokens) + PROMPT_MARGIN


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the vocabulary, chat template and special tokens: identifies the tokenization."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "chat_template": getattr(tokenizer, "chat_template", None) or "",
        "special_tokens": getattr(tokenizer, "special_tokens_map", None) or {},
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
