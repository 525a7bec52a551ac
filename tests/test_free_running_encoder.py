"""The label-private memory mode (``memory.keys=owner_greedy``): the PLM owner greedy-decodes its own continuation
of each prompt and answers a key per step; the data owner pairs them with its gold tokens.

References are naive: each example alone, unpadded, one full forward per step with no KV cache, its key read with
ContextTap. Tiny random float32 models; tolerances are stated where used.
"""

import functools

import numpy as np
import pytest
import torch

from pema.formats import tasks
from pema.formats.memory import MemoryReader
from pema.formats.tasks import OverlengthError
from pema.owner.build import prepare_examples
from pema.owner.encode import EncodeExample, FreeRunningEncoder, FreeRunningRequest, MemoryEncoder
from pema.owner.plm import load_plm, tiny_model
from pema.owner.respond import ContextTap

V = 97
ARCHS = {"llama": {"tie_word_embeddings": False},  # gpt2: learned absolute positions, so position_ids must be right
         "gpt2": {"tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
         "opt": {"tie_word_embeddings": False}}


@functools.lru_cache(maxsize=None)
def make_model(arch: str):
    """Tiny random model; input embeddings x30 so the final-norm input's RMS is far above sqrt(eps) and the greedy
    tokens vary from step to step (as in tests/test_owner.py). Cached: tests must not modify it."""
    model = tiny_model(arch, V, seed=0, **ARCHS[arch])
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(30)
        project_in = getattr(getattr(model.base_model, "decoder", None), "project_in", None)
        if project_in is not None:
            project_in.weight.mul_(30)
    return model


def requests(seed: int = 0) -> list[FreeRunningRequest]:
    """Prompts of 2..8 random ids and target lengths 1..6, both varied across the batch; example ids from 20."""
    rng = np.random.default_rng(seed)
    out = [FreeRunningRequest(20 + i, tuple(rng.integers(3, V, int(rng.integers(2, 9))).tolist()),
                              int(rng.integers(1, 7))) for i in range(6)]
    assert len({len(r.prompt_ids) for r in out}) > 2 and len({r.target_length for r in out}) > 2
    return out


@torch.no_grad()
def reference(model, reqs) -> tuple[np.ndarray, np.ndarray]:
    """(keys (n, d) float32, greedy (n,)): per example alone, full recompute each step, rows in encoder order."""
    keys, greedy = [], []
    with ContextTap(model) as tap:
        for r in reqs:
            seq = list(r.prompt_ids)
            for _ in range(r.target_length):
                logits = model(torch.tensor([seq])).logits[0, -1]
                keys.append(tap.last_key()[0])
                seq.append(int(logits.argmax()))
                greedy.append(seq[-1])
    return torch.stack(keys).numpy(), np.array(greedy)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_matches_step_by_step_reference(arch):
    model, reqs = make_model(arch), requests()
    rows = FreeRunningEncoder(model, pad_id=0)(reqs)
    keys, greedy = reference(model, reqs)
    lens = [r.target_length for r in reqs]
    np.testing.assert_array_equal(rows["example"], np.repeat([r.example for r in reqs], lens))
    np.testing.assert_array_equal(rows["position"], np.concatenate([np.arange(n) for n in lens]))
    assert rows["example"].dtype == np.int64 and rows["position"].dtype == np.int32
    assert rows["greedy"].dtype == np.int32 and rows["key"].dtype == np.float32 and rows["key"].shape == (sum(lens), 64)
    np.testing.assert_array_equal(rows["greedy"], greedy)  # exact: same argmax, padded + cached or not
    assert len(set(greedy.tolist())) > 3  # the continuation really varies, so feeding it back is tested
    # left padding, the KV cache and batching change only float rounding: 1e-5 absolute on unit-RMS keys
    np.testing.assert_allclose(rows["key"], keys, atol=1e-5, rtol=0)


def test_owner_continuation_as_gold_equals_teacher_forced():
    # when the gold target IS the owner's greedy continuation, both modes see the same contexts: same keys
    model, reqs = make_model("llama"), requests(seed=1)
    rows = FreeRunningEncoder(model)(reqs)
    split = np.cumsum([r.target_length for r in reqs])[:-1]
    examples = [EncodeExample(r.example, r.prompt_ids, tuple(g.tolist()))
                for r, g in zip(reqs, np.split(rows["greedy"], split))]
    forced = MemoryEncoder(model)(examples)
    np.testing.assert_array_equal(forced["token"], rows["greedy"])
    np.testing.assert_allclose(forced["key"], rows["key"], atol=1e-5, rtol=0)  # tolerance as above


def test_float16_keys_are_the_float32_keys_rounded():
    model, reqs = make_model("llama"), requests()
    full, half = FreeRunningEncoder(model)(reqs), FreeRunningEncoder(model, key_dtype="float16")(reqs)
    assert half["key"].dtype == np.float16
    np.testing.assert_array_equal(half["key"], full["key"].astype(np.float16))  # cast on the device, nothing else
    np.testing.assert_array_equal(half["greedy"], full["greedy"])


def test_overlength_is_named_before_the_model_runs():
    model = make_model("llama")
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        reqs = [FreeRunningRequest(1, (5, 6, 7), 3), FreeRunningRequest(7, (5,) * 8, 4)]  # 8 + 4 - 1 = 11 tokens
        with pytest.raises(OverlengthError, match=r"example 7: its free-running sequence has 11 tokens \(prompt 8 \+ "
                                                  r"target 4 - 1\), over the bound of 10"):
            FreeRunningEncoder(model, max_length=10)(reqs)
        FreeRunningEncoder(model, max_length=11)(reqs)  # exactly at the bound is fine
    finally:
        hook.remove()
    assert len(calls) == 4  # only the second call ran: prefill + 3 steps


def test_bad_input():
    with pytest.raises(ValueError, match="target_length=0"):
        FreeRunningRequest(3, (1, 2), 0)
    with pytest.raises(ValueError, match="target_length=True"):
        FreeRunningRequest(3, (1, 2), True)
    with pytest.raises(ValueError, match="example 3: empty prompt"):
        FreeRunningRequest(3, (), 2)
    with pytest.raises(ValueError, match="no requests"):
        FreeRunningEncoder(make_model("llama"))([])
    with pytest.raises(ValueError, match="key_dtype"):
        FreeRunningEncoder(make_model("llama"), key_dtype="bfloat16")


def test_config_names_memory_keys():
    from pema.config import load_config
    from pema.errors import ConfigError

    assert load_config(None, []).memory.keys == "teacher_forced"
    assert load_config(None, ["memory.keys=owner_greedy"]).memory.keys == "owner_greedy"
    with pytest.raises(ConfigError, match=r"^memory.keys='gold' is invalid"):
        load_config(None, ["memory.keys=gold"])


PAIRS = [
    tasks.Pair(0, "Hello world.", "Hallo Welt."),
    tasks.Pair(1, "The cat sleeps on the mat.", "Die Katze schläft auf der Matte."),
    tasks.Pair(2, "Thank you!", "Danke!"),
    tasks.Pair(3, "Where is the station?", "Wo ist der Bahnhof?"),
]


def test_build_pairs_owner_greedy_keys_with_gold_tokens(smollm2_tokenizer, tmp_path):
    from conftest import inline_build
    from pema.config import load_config

    out = tmp_path / "memory"
    forced = inline_build(PAIRS, out, dtype="float32", rows_per_part=7, batch_tokens=64)
    greedy = inline_build(PAIRS, out, dtype="float32", rows_per_part=7, batch_tokens=64, keys="owner_greedy")
    assert forced.extra["keys"] == "teacher_forced" and greedy.extra["keys"] == "owner_greedy"
    assert greedy.extra["fingerprint"] != forced.extra["fingerprint"]  # the teacher-forced memory was not reused
    rows = MemoryReader(out).read_all()
    assert set(rows) == {"key", "token", "example", "position"}  # the memory's schema: the owner's tokens stay out

    cfg = load_config(None, ["model.model_id=tiny://llama"])
    chat = tasks.use_chat_template(smollm2_tokenizer, cfg.model.prompt_format)
    examples, _ = prepare_examples(smollm2_tokenizer, PAIRS, template=tasks.resolve_template(cfg.data.template),
                                   source_field=cfg.data.source_field, chat=chat)
    order = np.lexsort((rows["position"], rows["example"]))
    rows = {k: v[order] for k, v in rows.items()}
    np.testing.assert_array_equal(rows["token"], np.concatenate([e.target_ids for e in examples]))  # gold tokens

    model, tokenizer = load_plm("tiny://llama", dtype=cfg.model.dtype)  # the model the build loaded
    expected = FreeRunningEncoder(model, pad_id=tokenizer.pad_token_id or 0)(
        [FreeRunningRequest(e.example, e.prompt_ids, len(e.target_ids)) for e in examples])
    np.testing.assert_array_equal(rows["example"], expected["example"])
    np.testing.assert_array_equal(rows["position"], expected["position"])
    # other batches (the build's length batches) than one: float rounding only, 1e-5 absolute on unit-RMS keys
    np.testing.assert_allclose(rows["key"], expected["key"], atol=1e-5, rtol=0)
    assert not np.array_equal(rows["token"], expected["greedy"])  # the owner's continuation is not the gold one
