"""Tests of the PLM owner's side (pema.owner): keys, memory building and the exported head.

Everything runs on tiny random-weight float32 models; only the alignment tests use SmolLM2's real tokenizer.
"""

import functools
import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pema.formats import tasks
from pema.adapter.io import load_head
from pema.errors import ConfigError, DataError, MemoryFormatError, MemoryMismatchError, UnsupportedArchitectureError
from pema.formats.keys import KEY_DEFINITION
from pema.formats.memory import MemoryReader, verify_memory
from pema.formats.memory_writer import MemoryWriter
from pema.owner import encode as build_mod
from tests.conftest import inline_build
from pema.owner.build import prepare_examples
from pema.owner.encode import EncodeExample, MemoryEncoder, length_batches
from pema.owner.export import export_head
from pema.owner.plm import SMOLLM2_GGUF, head_modules, load_plm, load_tokenizer, resolve_model, tiny_model
from pema.owner.respond import ContextTap

V = 97  # vocabulary of the random-id models
ARCHS = {  # name -> (architecture, config overrides); all float32, untied (see make_model)
    "llama": ("llama", {"tie_word_embeddings": False}),
    "gpt2": ("gpt2", {"tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}),
    "opt": ("opt", {"tie_word_embeddings": False}),
    "opt-proj": ("opt", {"tie_word_embeddings": False, "word_embed_proj_dim": 32}),  # project_out 64 -> 32 after the norm
}
TEMPLATE = tasks.TEMPLATES["wmt22_en_de"]
PAIRS = [
    tasks.Pair(0, "Hello world.", "Hallo Welt."),
    tasks.Pair(1, "The cat sleeps on the mat.", "Die Katze schläft auf der Matte."),
    tasks.Pair(2, "Thank you!", "Danke!"),
    tasks.Pair(3, "Where is the station?", "Wo ist der Bahnhof?"),
    tasks.Pair(4, "I like green apples and red cherries.", "Ich mag grüne Äpfel und rote Kirschen."),
]


@functools.lru_cache(maxsize=None)
def make_model(name: str, vocab_size: int = V):
    """Tiny model made a little more like a trained one. Cached: tests must not modify the returned model.

    - The final norm gets a random gain (and bias): at init g=1, b=0, which would hide a head that forgets them.
    - The input embeddings (and OPT's project_in) are scaled x30: at init the final-norm input has RMS ~0.03, so
      eps (1e-5) shifts a re-normalized key by ~0.5%; trained models have RMS >> sqrt(eps). Embeddings are
      untied so the scaling leaves the LM head (and the logits' scale, ~0.2) alone.
    """
    arch, overrides = ARCHS[name]
    model = tiny_model(arch, vocab_size, seed=0, **overrides)
    norm = head_modules(model).norm
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        assert model.get_input_embeddings().weight is not model.get_output_embeddings().weight
        model.get_input_embeddings().weight.mul_(30)
        project_in = getattr(getattr(model.base_model, "decoder", None), "project_in", None)
        if project_in is not None:
            project_in.weight.mul_(30)
        norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=gen))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=gen))
    return model


def random_examples(n: int, seed: int = 0) -> list[EncodeExample]:
    """Examples of random ids with varied prompt (2..8) and target (1..6) lengths; example ids start at 10."""
    rng = np.random.default_rng(seed)
    return [EncodeExample(10 + i, tuple(rng.integers(3, V, int(rng.integers(2, 9))).tolist()),
                          tuple(rng.integers(3, V, int(rng.integers(1, 7))).tolist())) for i in range(n)]


@torch.no_grad()
def reference_logits(model, examples, with_hidden: bool = False):
    """The PLM's own logits, one unpadded full forward per example, at the positions predicting each target token
    (rows in encoder order: example by example, positions 0..T-1); with_hidden also returns the final norm's raw
    input at those positions."""
    seen = []
    hook = head_modules(model).norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0]))
    logits_out, hidden_out = [], []
    try:
        for e in examples:
            seq = list(e.prompt_ids) + list(e.target_ids[:-1])
            logits = model(torch.tensor([seq])).logits[0].float()
            rows = slice(len(e.prompt_ids) - 1, len(e.prompt_ids) - 1 + len(e.target_ids))
            logits_out.append(logits[rows])
            hidden_out.append(seen[-1][rows].float())
    finally:
        hook.remove()
    return (torch.cat(logits_out), torch.cat(hidden_out)) if with_hidden else torch.cat(logits_out)


def sort_rows(rows: dict) -> dict:
    order = np.lexsort((np.asarray(rows["position"]), np.asarray(rows["example"])))
    return {k: np.asarray(v)[order] for k, v in rows.items()}


def memory_files(path) -> list[str]:
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if n.endswith((".parquet", ".tmp")) or n == "manifest.json")


def build(model, tokenizer, pairs, out_dir, **kw):
    """The build stage, inline; it loads ``tiny://llama`` itself, the same model as ``chat_llama``."""
    return inline_build(pairs, out_dir, **{"dtype": "float32", "rows_per_part": 7, **kw})


@pytest.fixture(scope="module")
def chat_llama(smollm2_tokenizer):
    """Tiny llama over SmolLM2's full vocabulary, for the real-tokenizer tests: the model ``tiny://llama`` loads, which
    the build stage encodes with."""
    from pema.owner.plm import tiny_model

    return tiny_model("llama", len(smollm2_tokenizer))


# 1. exported head reproduces the PLM's logits from stored keys


@pytest.mark.parametrize("name", list(ARCHS))
def test_head_from_key_reproduces_plm_logits(name, tmp_path):
    model = make_model(name)
    examples = random_examples(4)
    rows = MemoryEncoder(model)(examples)
    assert rows["key"].dtype == np.float32 and rows["key"].shape == (sum(len(e.target_ids) for e in examples), 64)
    np.testing.assert_array_equal(rows["token"], np.concatenate([e.target_ids for e in examples]))

    export_head(model, tmp_path / "head", model_id=f"tiny://{name}")
    head, _ = load_head(tmp_path / "head")
    assert (head.proj_weight is not None) == (name == "opt-proj")
    expected, hidden = reference_logits(model, examples, with_hidden=True)

    # from_key = W (g*k + b): float32 matmuls over d=64, so 1e-4 absolute is far above rounding noise
    torch.testing.assert_close(head.from_key(torch.from_numpy(rows["key"])), expected, atol=1e-4, rtol=0)

    # the same after a float32 round trip through the on-disk memory (several parts)
    with MemoryWriter(tmp_path / "mem", d=head.d, vocab_size=head.vocab_size, dtype="float32", rows_per_part=5,
                      model_id=f"tiny://{name}", model_revision=None, tokenizer_hash="", template="",
                      key_definition=KEY_DEFINITION) as writer:
        writer.add(**rows)
        writer.close(num_examples=len(examples), source_tokens=0)
    back = MemoryReader(tmp_path / "mem").read_all()
    assert back["key"].dtype == np.float32
    for col in ("token", "example", "position"):
        np.testing.assert_array_equal(back[col], rows[col])
    torch.testing.assert_close(head.from_key(torch.from_numpy(back["key"])), expected, atol=1e-4, rtol=0)

    # forward() applies the full final norm: on the raw norm input it is exact (1e-4); on a key, which is
    # already normalized up to eps, it is only close (1e-3; the tiny models' hidden RMS is >> sqrt(eps))
    torch.testing.assert_close(head(hidden), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(head(torch.from_numpy(rows["key"])), expected, atol=1e-3, rtol=0)


def test_opt_projection_is_located():
    assert head_modules(make_model("opt")).proj is None  # word_embed_proj_dim == hidden_size: no projection
    proj = head_modules(make_model("opt-proj")).proj
    assert proj is not None and tuple(proj.weight.shape) == (32, 64)


# 2. alignment with the real tokenizer


def test_memory_rows_align_with_target_tokens(smollm2_tokenizer, chat_llama, tmp_path):
    tok = smollm2_tokenizer
    stop = tasks.stop_token_id(tok, chat=True)
    assert tok.convert_ids_to_tokens(stop) == "<|im_end|>"
    examples, _ = prepare_examples(tok, PAIRS, template=TEMPLATE, source_field="en", chat=True)
    manifest = build(chat_llama, tok, PAIRS, tmp_path / "mem", batch_tokens=64)
    rows = MemoryReader(tmp_path / "mem").read_all()

    total = sum(len(e.target_ids) for e in examples)
    assert total == manifest.total_rows == len(rows["token"])
    assert manifest.num_examples == len(PAIRS) and manifest.extra["stop_token_id"] == stop
    assert sorted(set(rows["example"].tolist())) == [p.index for p in PAIRS]

    for pair, e in zip(PAIRS, examples):
        # the prompt ends with the assistant header, so its last position predicts the first target token
        assert tok.decode(e.prompt_ids).endswith("<|im_start|>assistant\n")
        sel = rows["example"] == pair.index
        order = np.argsort(rows["position"][sel], kind="stable")
        tokens, positions = rows["token"][sel][order], rows["position"][sel][order]
        np.testing.assert_array_equal(positions, np.arange(len(e.target_ids)))
        assert tokens.tolist() == list(e.target_ids)
        assert tokens[-1] == stop
        assert tok.decode(tokens[:-1].tolist()) == pair.target

    # each stored key sits at the position that predicts its token (tolerance as in test 1)
    export_head(chat_llama, tmp_path / "head", model_id="tiny://llama")
    head, _ = load_head(tmp_path / "head")
    s = sort_rows(rows)
    expected = reference_logits(chat_llama, sorted(examples, key=lambda e: e.example))
    torch.testing.assert_close(head.from_key(torch.from_numpy(s["key"])), expected, atol=1e-4, rtol=0)


# 3. batching does not change the memory


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt-proj"])
def test_encoder_batching_invariant(name):
    model = make_model(name)
    encoder = MemoryEncoder(model)
    examples = random_examples(7, seed=3)
    batches = length_batches(examples, max_tokens=20)
    assert len(batches) > 2 and any(len(b) > 1 for b in batches)  # several padded forward passes
    parts = [encoder(b) for b in batches]
    several = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    one, several = sort_rows(encoder(examples)), sort_rows(several)
    for col in ("example", "position", "token"):
        np.testing.assert_array_equal(several[col], one[col])
    # different padding widths change only float rounding: 1e-5 absolute on unit-RMS keys
    np.testing.assert_allclose(several["key"], one["key"], atol=1e-5, rtol=0)


def test_build_memory_batching_invariant(smollm2_tokenizer, chat_llama, tmp_path):
    build(chat_llama, smollm2_tokenizer, PAIRS, tmp_path / "one", batch_tokens=100_000)
    build(chat_llama, smollm2_tokenizer, PAIRS, tmp_path / "many", batch_tokens=1)  # one example per forward
    one = sort_rows(MemoryReader(tmp_path / "one").read_all())
    many = sort_rows(MemoryReader(tmp_path / "many").read_all())
    for col in ("example", "position", "token"):
        np.testing.assert_array_equal(many[col], one[col])
    np.testing.assert_allclose(many["key"], one["key"], atol=1e-5, rtol=0)  # float32 memories


# 4. ContextTap


def _reference_key(x: torch.Tensor, norm_type: str, eps: float) -> torch.Tensor:
    """Parameter-free norm in float64, written out independently of pema.formats.keys."""
    x = x.double()
    if norm_type == "rms":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    centered = x - x.mean(-1, keepdim=True)
    return centered / torch.sqrt((centered * centered).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt-proj"])
def test_context_tap_reads_normalized_final_norm_input(name):
    model = make_model(name)
    heads = head_modules(model)
    seen = {}
    hook = heads.norm.register_forward_hook(
        lambda _m, args, out: seen.update(x=args[0].detach().clone(), y=out.detach().clone()))
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad(), ContextTap(model) as tap:
            model(torch.randint(3, V, (2, 5), generator=gen))
            model(torch.randint(3, V, (2, 7), generator=gen))  # the tap must follow the latest forward
            last, keys = tap.last_key(), tap.keys()
    finally:
        hook.remove()
    assert last.dtype == torch.float32 and last.shape == (2, 64) and keys.shape == (2, 7, 64)
    ref = _reference_key(seen["x"], heads.norm_type, heads.eps).float()
    torch.testing.assert_close(keys, ref, atol=1e-5, rtol=0)  # float32 vs float64 on unit-scale values
    torch.testing.assert_close(last, ref[:, -1], atol=1e-5, rtol=0)
    # the norm's own output is g * key + b: the key is exactly what the norm normalizes
    bias = getattr(heads.norm, "bias", None)
    rebuilt = heads.norm.weight * last + (0 if bias is None else bias)
    torch.testing.assert_close(rebuilt, seen["y"][:, -1], atol=1e-5, rtol=0)


def test_context_tap_without_forward_raises():
    model = make_model("llama")
    tap = ContextTap(model)
    with pytest.raises(RuntimeError, match="no forward"):
        tap.last_key()  # never entered
    with tap:
        with pytest.raises(RuntimeError, match="no forward"):
            tap.last_key()  # entered, nothing run yet
        with pytest.raises(RuntimeError):
            tap.__enter__()  # already attached
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7]]))
        assert tap.last_key().shape == (1, 64)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))  # after exit the hook is gone and nothing is recorded
    with pytest.raises(RuntimeError, match="no forward"):
        tap.keys()


# 5. unsupported architectures


def _tiny_unsupported(model_type: str):
    shapes = {"gpt_neox": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64),
              "bloom": dict(hidden_size=32, n_layer=1, n_head=4)}
    config = AutoConfig.for_model(model_type, vocab_size=V, **shapes[model_type])
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["gpt_neox", "bloom"])
def test_unsupported_architecture_is_named(model_type, tmp_path):
    model = _tiny_unsupported(model_type)
    for call in (head_modules, ContextTap, MemoryEncoder, lambda m: export_head(m, tmp_path, model_id="x")):
        with pytest.raises(UnsupportedArchitectureError, match=repr(model_type)):
            call(model)
    assert not os.listdir(tmp_path)  # export wrote nothing


def test_opt_without_final_norm_is_unsupported():
    model = tiny_model("opt", V, do_layer_norm_before=False)  # like opt-350m: no final_layer_norm
    with pytest.raises(UnsupportedArchitectureError, match="final norm"):
        head_modules(model)


# 6. resolve_model


def test_resolve_model(tmp_path):
    with pytest.raises(ConfigError, match="no_such_pkg"):
        resolve_model("pkg://no_such_pkg/x.gguf")
    with pytest.raises(ConfigError, match="no file"):
        resolve_model("pkg://pema/no_such_file.gguf")  # package exists, file does not
    with pytest.raises(ConfigError, match="not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError):
        resolve_model("")
    ref = resolve_model(SMOLLM2_GGUF)
    assert ref.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.isfile(os.path.join(ref.path, ref.gguf_file))
    assert resolve_model("org/some-model") == type(ref)("org/some-model", None)


@pytest.mark.parametrize("model_id", ["/nonexistent/model", "./no_model_here", "../no_model_here", "~/no_model",
                                      "a/b/c", "tests/no_such_model"])
def test_missing_model_path_is_named_before_transformers(model_id, monkeypatch):
    import transformers

    def called(*args, **kwargs):
        raise AssertionError("transformers was asked to load a path that does not exist")

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/ exists there
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", called)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", called)
    message = f"model.model_id={model_id!r}: no such file or folder"
    for load in (resolve_model, load_tokenizer, load_plm):
        with pytest.raises(ConfigError) as exc:
            load(model_id)
        assert str(exc.value).startswith(message), str(exc.value)


def test_hub_ids_and_existing_paths_are_not_refused(tmp_path):
    assert resolve_model("org/some-model").path == "org/some-model"  # a hub id: org/name
    assert resolve_model("gpt2").path == "gpt2"
    assert resolve_model("tiny://llama").path == "tiny://llama"
    assert resolve_model(str(tmp_path)).path == str(tmp_path)  # exists: transformers reads the folder


def test_resolve_model_missing_dotted_package_is_config_error():
    with pytest.raises(ConfigError):
        resolve_model("pkg://no_such_pkg.sub/x.gguf")


# 7. failures leave nothing half-written


def test_empty_target_raises_before_writing(smollm2_tokenizer, chat_llama, tmp_path):
    bad = PAIRS[:2] + [tasks.Pair(2, "Hello.", "")]
    with pytest.raises(DataError, match="no tokens"):
        build(chat_llama, smollm2_tokenizer, bad, tmp_path / "mem")
    assert memory_files(tmp_path / "mem") == []
    # and an earlier, complete memory in the same folder is left intact
    build(chat_llama, smollm2_tokenizer, PAIRS[:2], tmp_path / "old")
    before = sorted(os.listdir(tmp_path / "old"))
    with pytest.raises(DataError):
        build(chat_llama, smollm2_tokenizer, bad, tmp_path / "old")
    assert sorted(os.listdir(tmp_path / "old")) == before
    verify_memory(tmp_path / "old")


def test_failure_mid_build_removes_parts(smollm2_tokenizer, chat_llama, tmp_path, monkeypatch):
    out = tmp_path / "mem"
    staging = tmp_path / "mem.partial"  # the build writes here and moves the memory into place when complete
    original, calls, seen_before_failure = MemoryEncoder.__call__, [], []

    def flaky(self, examples):
        calls.append(len(examples))
        if len(calls) == 2:
            seen_before_failure.extend(memory_files(staging))
            raise RuntimeError("boom in batch 2")
        return original(self, examples)

    monkeypatch.setattr(build_mod.MemoryEncoder, "__call__", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        build(chat_llama, smollm2_tokenizer, PAIRS, out, batch_tokens=1, rows_per_part=2)
    assert any(n.endswith(".parquet") for n in seen_before_failure)  # batch 1 did write parts...
    assert memory_files(out) == []  # ...but no memory is in place
    assert not (staging / "manifest.json").exists()  # the staged parts wait, with their sidecars, for the rerun
    calls.clear()
    monkeypatch.setattr(build_mod.MemoryEncoder, "__call__", original)
    manifest = build(chat_llama, smollm2_tokenizer, PAIRS, out, batch_tokens=1, rows_per_part=2)
    assert verify_memory(out) == manifest and not staging.exists()


def test_failed_rebuild_keeps_old_memory(smollm2_tokenizer, chat_llama, tmp_path, monkeypatch):
    out = tmp_path / "mem"
    build(chat_llama, smollm2_tokenizer, PAIRS[:2], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(self, examples):
        raise RuntimeError("owner crashed")

    monkeypatch.setattr(build_mod.MemoryEncoder, "__call__", broken)
    with pytest.raises(RuntimeError, match="owner crashed"):
        build(chat_llama, smollm2_tokenizer, PAIRS, out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    verify_memory(out)


# 8. head bundle files


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt-proj"])
def test_export_head_metadata(name, tmp_path):
    model = make_model(name)
    meta = export_head(model, tmp_path, model_id=f"tiny://{name}", tokenizer_hash="abc")
    on_disk = json.loads((tmp_path / "head.json").read_text())
    assert on_disk == meta
    cfg_eps = {"llama": "rms_norm_eps", "gpt2": "layer_norm_epsilon"}.get(model.config.model_type)
    expected_eps = getattr(model.config, cfg_eps) if cfg_eps else head_modules(model).norm.eps
    assert (on_disk["d"], on_disk["vocab_size"]) == (64, V)
    assert on_disk["norm_type"] == ("rms" if name == "llama" else "layer")
    assert on_disk["eps"] == expected_eps
    assert sorted(os.listdir(tmp_path)) == ["head.json", "head.safetensors"]  # no .tmp left behind


def test_load_head_rejects_incomplete_or_inconsistent_bundle(tmp_path):
    with pytest.raises(MemoryFormatError):
        load_head(tmp_path)  # empty folder
    export_head(make_model("llama"), tmp_path, model_id="tiny://llama")
    meta = json.loads((tmp_path / "head.json").read_text())
    (tmp_path / "head.json").write_text(json.dumps({**meta, "d": 65}))
    with pytest.raises(MemoryMismatchError, match="d=65"):
        load_head(tmp_path)
    (tmp_path / "head.json").unlink()
    with pytest.raises(MemoryFormatError, match="head.json"):
        load_head(tmp_path)  # tensors without metadata


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_load_plm_from_local_folder_in_each_dtype(smollm2_tokenizer, tmp_path, dtype):
    from pema.owner.plm import load_plm, tiny_model

    reference = tiny_model("llama", len(smollm2_tokenizer), seed=5)
    reference.save_pretrained(tmp_path / "m")  # safetensors
    smollm2_tokenizer.save_pretrained(tmp_path / "m")
    model, tokenizer = load_plm(str(tmp_path / "m"), dtype=dtype)
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    assert tokenizer("Hallo Welt")["input_ids"] == smollm2_tokenizer("Hallo Welt")["input_ids"]
    ids = torch.tensor([[5, 17, 300, 4000]])
    with torch.no_grad():
        got, want = model(ids).logits.float(), reference(ids).logits
    tol = 1e-5 if dtype == "float32" else 5e-2  # half precision weights: loose, same model
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
