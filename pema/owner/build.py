"""The PLM owner's side of the memory build: the pairs tokenized exactly as at inference. The build itself (plan,
encoding on an executor, parts, manifest) is the stage :mod:`pema.stages.build`."""
from __future__ import annotations

from typing import Sequence

from pema.formats.tasks import Pair, source_prompt_ids, source_token_count, stop_token_id, target_ids
from pema.owner.encode import EncodeExample


def prepare_examples(tokenizer, pairs: Sequence[Pair], *, template: str, source_field: str,
                     chat: bool) -> tuple[list[EncodeExample], list[int]]:
    """Tokenize pairs exactly as at inference; returns the examples and each one's source-token count."""
    examples, source_tokens = [], []
    stop = stop_token_id(tokenizer, chat=chat)  # once: it copies the whole vocabulary
    for pair in pairs:
        prompt = source_prompt_ids(tokenizer, template, pair.source, source_field=source_field, chat=chat)
        target = target_ids(tokenizer, pair.target, chat=chat, stop_id=stop)
        examples.append(EncodeExample(pair.index, tuple(prompt), tuple(target)))
        source_tokens.append(source_token_count(tokenizer, pair.source))
    return examples, source_tokens
