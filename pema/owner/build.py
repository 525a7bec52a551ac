"""Build an external memory on the PLM owner's side: tokenize pairs, encode keys, write Parquet parts + manifest."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from pema.keys import KEY_DEFINITION
from pema.memory import MemoryManifest, MemoryWriter
from pema.owner.encode import EncodeExample, MemoryEncoder, length_batches
from pema.owner.plm import head_modules
from pema.tasks import Pair, source_prompt_ids, source_token_count, stop_token_id, target_ids, tokenizer_hash


def prepare_examples(tokenizer, pairs: Sequence[Pair], *, template: str, source_field: str,
                     chat: bool) -> tuple[list[EncodeExample], int]:
    """Tokenize pairs exactly as at inference; returns the examples and the total source-token count."""
    examples, source_tokens = [], 0
    stop = stop_token_id(tokenizer, chat=chat)  # once: it copies the whole vocabulary
    for pair in pairs:
        prompt = source_prompt_ids(tokenizer, template, pair.source, source_field=source_field, chat=chat)
        target = target_ids(tokenizer, pair.target, chat=chat, stop_id=stop)
        examples.append(EncodeExample(pair.index, tuple(prompt), tuple(target)))
        source_tokens += source_token_count(tokenizer, pair.source)
    return examples, source_tokens


def build_memory(model, tokenizer, pairs: Sequence[Pair], out_dir: str | os.PathLike, *, model_id: str,
                 model_revision: str | None, template: str, source_field: str, chat: bool, dtype: str = "float16",
                 rows_per_part: int = 65536, batch_tokens: int = 4096, overwrite: bool = True,
                 progress: bool = True) -> MemoryManifest:
    """Teacher-forced memory of ``pairs``.

    The memory is written into ``<out_dir>.partial`` and moved into place only when complete, so a failed build
    leaves neither a half-written memory nor a missing old one (without ``overwrite`` an existing one is refused).
    """
    if not pairs:
        raise ValueError("no pairs to build a memory from")
    examples, source_tokens = prepare_examples(tokenizer, pairs, template=template, source_field=source_field, chat=chat)
    heads = head_modules(model)
    encoder = MemoryEncoder(model, pad_id=tokenizer.pad_token_id or 0, key_dtype=dtype)
    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a memory; pass overwrite=True to rebuild it")
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    writer = MemoryWriter(
        staging, d=int(heads.norm.weight.shape[0]), vocab_size=int(heads.lm_head.weight.shape[0]), dtype=dtype,
        rows_per_part=rows_per_part, model_id=model_id, model_revision=model_revision,
        tokenizer_hash=tokenizer_hash(tokenizer), template=template, key_definition=KEY_DEFINITION,
        extra={"prompt_format": "chat" if chat else "raw", "stop_token_id": stop_token_id(tokenizer, chat=chat),
               "source_field": source_field})
    total = sum(len(e.target_ids) for e in examples)
    try:
        with writer, tqdm(total=total, desc="build memory", unit="row", disable=not progress, leave=False) as bar:
            for batch in length_batches(examples, batch_tokens):
                rows = encoder(batch)
                writer.add(**rows)
                bar.update(len(rows["token"]))
            manifest = writer.close(num_examples=len(examples), source_tokens=source_tokens)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    return manifest
