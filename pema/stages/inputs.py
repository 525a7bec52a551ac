"""What the stages read, checked before they write anything: the JSONL pairs, the model path, the bundles of an
output folder, and the data owner's view of them (the head and both memories, checked against each other)."""
from __future__ import annotations

import functools
import os

from pema.adapter.io import load_adapter, load_head
from pema.config import PipelineConfig, to_dict
from pema.errors import ConfigError, DataError
from pema.formats.hygiene import TASK_LANGUAGES, HygieneReport, clean_splits
from pema.formats.layout import RunLayout
from pema.formats.versions import memory_info
from pema.formats.memory import MemoryReader, verify_memory
from pema.formats.tasks import Pair, TokenCap, check_pairs, load_pairs


SPLITS = ("train", "dev", "test", "ood_test")  # hygiene's order: a later split is kept disjoint from the earlier


def token_cap(cfg: PipelineConfig, tokenizer=None) -> TokenCap:
    """``data.max_tokens`` / ``data.overlength`` as a :class:`~pema.formats.tasks.TokenCap`: counting every text with
    ``tokenizer``, or (None) past the byte bound with the model's tokenizer, loaded only if a text needs it."""
    if tokenizer is not None:
        return TokenCap(cfg.data.max_tokens, cfg.data.overlength, tokenizer=tokenizer)

    def load():
        if not cfg.resources.owner_url:
            check_model_id(cfg.model.model_id)  # a named error, not the loader's, for a wrong model path
        return tokenizer_of(cfg)

    return TokenCap(cfg.data.max_tokens, cfg.data.overlength, load=load)


def _raw_pairs(cfg: PipelineConfig, split: str, cap: TokenCap) -> list[Pair]:
    d = cfg.data
    return load_pairs(getattr(d, split), limit=getattr(d, f"{split}_limit"), source_field=d.source_field,
                      target_field=d.target_field, cap=cap)


def cleaned_splits(cfg: PipelineConfig, upto: str = "ood_test", *,
                   tokenizer=None) -> tuple[dict[str, list[Pair]], HygieneReport]:
    """The configured splits up to ``upto`` (in :data:`SPLITS` order), each limited by ``data.<split>_limit``, its
    texts held to ``data.max_tokens`` (:func:`token_cap` with ``tokenizer``: an OverlengthError, or cut and counted
    in the report's ``truncated``) and then cleaned (:mod:`pema.formats.hygiene`; nothing is dropped with
    ``data.hygiene: false``), with the report. A split left without pairs is a DataError naming its file."""
    names = [s for s in SPLITS[:SPLITS.index(upto) + 1] if getattr(cfg.data, s) is not None]
    caps = {s: token_cap(cfg, tokenizer) for s in names}
    raw = {s: _raw_pairs(cfg, s, caps[s]) for s in names}
    truncated = {s: cap.truncated for s, cap in caps.items()}
    if not cfg.data.hygiene:
        return raw, HygieneReport(kept={s: len(p) for s, p in raw.items()}, truncated=truncated)
    kept, report = clean_splits(raw, TASK_LANGUAGES.get(cfg.data.template))
    report.truncated = truncated
    for s in names:
        if not kept[s]:
            raise DataError(f"{getattr(cfg.data, s)}: every pair of data.{s} was dropped by the pair hygiene "
                            f"({'; '.join(report.lines())}); fix the file or set data.hygiene=false")
    return kept, report


def split_pairs(cfg: PipelineConfig, split: str, *, tokenizer=None) -> list[Pair]:
    """The pairs of ``data.<split>`` (``train``, ``dev``, ``test`` or ``ood_test``), limited by
    ``data.<split>_limit``, held to ``data.max_tokens`` and cleaned (:func:`cleaned_splits`); a bad file raises a
    DataError naming ``<path>:<line>``."""
    if split not in SPLITS or getattr(cfg.data, split) is None:
        raise ConfigError(f"split {split!r} is not one of the configured splits "
                          f"{[s for s in SPLITS if getattr(cfg.data, s) is not None]}")
    return cleaned_splits(cfg, split, tokenizer=tokenizer)[0][split]


def pairs_of_file(cfg: PipelineConfig, path, *, held_out: bool, tokenizer=None) -> tuple[list[Pair], HygieneReport]:
    """The pairs of a JSONL file given to a memory command (``--pairs``), held to ``data.max_tokens`` as the build
    holds them. ``held_out``: cleaned as training pairs are (:mod:`pema.formats.hygiene`), and a pair whose source or
    target is in a configured held-out split (dev, test, ood_test) is dropped, so appending never leaks a test pair
    into the memory. Without it (a deletion), the pairs are taken as written."""
    pairs = load_pairs(path, source_field=cfg.data.source_field, target_field=cfg.data.target_field,
                       cap=token_cap(cfg, tokenizer))
    if not held_out or not cfg.data.hygiene:
        return pairs, HygieneReport(kept={"pairs": len(pairs)})
    held = {s: p for s, p in cleaned_splits(cfg, tokenizer=tokenizer)[0].items() if s != "train"}
    kept, report = clean_splits({**held, "pairs": pairs}, TASK_LANGUAGES.get(cfg.data.template))
    return kept["pairs"], report


def check_inputs(cfg: PipelineConfig, output_dir: str | os.PathLike | None = None, *,
                 splits: tuple[str, ...] = (), model: bool = False, bundles: tuple[str, ...] = ()) -> None:
    """Check what a stage reads before it writes anything: the JSONL pairs of ``splits`` (DataError naming
    ``<path>:<line>``, FileNotFoundError; with ``data.overlength: error`` an OverlengthError for a text over
    ``data.max_tokens``, the tokenizer loaded only if a text is past the byte bound), ``model.model_id`` when ``model`` (ConfigError when it names a path
    that does not exist) and the ``bundles`` files under ``output_dir`` (FileNotFoundError naming the jobs that
    make them; a damaged or edited memory, head or adapter: the reader's named error)."""
    d = cfg.data
    if "test" in splits and d.ood_test is not None:
        splits = (*splits, "ood_test")
    cap = token_cap(cfg) if d.overlength == "error" else None  # truncate: the stage cuts and counts
    for split in splits:  # in constant memory: a file of 10^6 lines is read, not kept
        check_pairs(getattr(d, split), limit=getattr(d, f"{split}_limit"), source_field=d.source_field,
                    target_field=d.target_field, cap=cap)
    if model:
        check_model_id(cfg.model.model_id)
    if bundles and (missing := RunLayout(output_dir).missing(bundles)):
        raise FileNotFoundError(missing_bundles(output_dir, missing))
    if bundles:  # damaged or edited bundles: a named error here, before MLflow or Ray starts
        layout, head_meta = RunLayout(output_dir), None
        if "head/head.json" in bundles:
            _, head_meta = load_head(layout.head)
        for split in ("train", "dev"):
            if f"memory/{split}/manifest.json" in bundles:
                verify_memory(layout.memory(split))
        if "adapter/adapter.json" in bundles:
            load_adapter(layout.adapter, head_meta)


def missing_bundles(output_dir, missing: list[str]) -> str:
    """What a folder lacks and the command that makes it: ``pema build`` the memories and the head, ``pema train``
    the adapter (which needs them)."""
    owner = [m for m in missing if not m.startswith("adapter/")]
    what = ", ".join(dict.fromkeys(m.rsplit("/", 1)[0] + "/" for m in missing))
    make = ("`pema build`" + (", then `pema train`," if len(owner) < len(missing) else "")) if owner else "`pema train`"
    return (f"--output-dir {output_dir} lacks {missing} ({what}): make {'them' if len(missing) > 1 else 'it'} with "
            f"{make} on this --output-dir and the same --config")


def _first_bytes(path: str, n: int = 4) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def check_model_id(model_id: str) -> None:
    """ConfigError naming ``model.model_id`` when it is a path that does not exist or is neither a model folder
    (with a config.json) nor a GGUF file, a ``pkg://`` file that is not installed or a ``tiny://`` architecture
    that is unknown; nothing is loaded (transformers stays unimported)."""
    from pema.owner.plm import TINY_SHAPES, resolve_model

    try:
        ref = resolve_model(model_id)
        arch = model_id[len("tiny://"):] if model_id.startswith("tiny://") else None
        if arch is not None and arch not in TINY_SHAPES:
            raise ConfigError(f"tiny model architecture {arch!r} is not one of {sorted(TINY_SHAPES)}")
        if ref.gguf_file and _first_bytes(os.path.join(ref.path, ref.gguf_file)) != b"GGUF":
            raise ConfigError("not a GGUF file (it does not start with the bytes 'GGUF')")
        elif "://" not in model_id and os.path.exists(ref.path) and \
                not os.path.isfile(os.path.join(ref.path, "config.json")):
            raise ConfigError("not a model folder (no config.json in it) nor a .gguf file")
    except ConfigError as exc:
        if str(exc).startswith("model.model_id="):
            raise
        raise ConfigError(f"model.model_id={model_id!r}: {exc}") from None


def open_bundles(output_dir: str | os.PathLike):
    """The data owner's inputs under ``output_dir``: ``(head, head_meta, train_reader, dev_reader)``, with both
    memories checked against the head (d, vocabulary, model id)."""
    layout = RunLayout(output_dir)
    head, head_meta = load_head(layout.head)
    readers = MemoryReader(layout.memory("train")), MemoryReader(layout.memory("dev"))
    for reader in readers:
        reader.check_compatible(d=head_meta["d"], vocab_size=head_meta["vocab_size"], model_id=head_meta["model_id"])
    return (head, head_meta, *readers)


def adapter_meta(cfg: PipelineConfig, head_meta: dict, train_reader: MemoryReader, **extra) -> dict:
    """The JSON that travels with a trained adapter bundle (the target/source ratio sets the GU horizons)."""
    return {"model_id": head_meta["model_id"], "config": to_dict(cfg.adapter),
            "target_source_ratio": train_reader.manifest.target_source_ratio,
            "memory": memory_info(train_reader.mem_dir), **extra}


def plm_or_client(cfg: PipelineConfig):
    """``(model, tokenizer)``: the PLM in this process, or, with ``resources.owner_url``, an
    :class:`~pema.adapter.remote.OwnerClient` of the owner's service and the tokenizer it serves (no PLM file is
    opened here)."""
    if cfg.resources.owner_url:
        client = owner_client(cfg)
        return client, client.tokenizer()
    from pema.owner.plm import load_plm  # the PLM's weights: the owner's side

    return load_plm(cfg.model.model_id, dtype=cfg.model.dtype, device=cfg.resources.device, revision=cfg.model.revision)


def tokenizer_of(cfg: PipelineConfig):
    """The tokenizer alone: from the owner's service with ``resources.owner_url``, else from the model's files."""
    if cfg.resources.owner_url:
        return owner_client(cfg).tokenizer()
    return local_tokenizer(cfg.model.model_id, cfg.model.revision)


@functools.lru_cache(maxsize=2)
def local_tokenizer(model_id: str, revision: str | None):
    """The model's tokenizer, loaded once per process (seconds for a GGUF file): the check at a job's edge and the
    build's plan in the same driver share it."""
    from pema.owner.plm import load_tokenizer

    return load_tokenizer(model_id, revision)


def owner_client(cfg: PipelineConfig):
    """An :class:`~pema.adapter.remote.OwnerClient` of ``resources.owner_url`` with this tenant's token."""
    from pema.adapter.remote import OwnerClient

    return OwnerClient(cfg.resources.owner_url, owner_token(cfg))


def owner_token(cfg: PipelineConfig) -> str:
    """This tenant's bearer token for the owner's service, from ``$<resources.owner_token_env>``."""
    if not (token := os.environ.get(cfg.resources.owner_token_env)):
        raise ConfigError(f"resources.owner_url={cfg.resources.owner_url} needs a bearer token in "
                          f"${cfg.resources.owner_token_env} (resources.owner_token_env)")
    return token
