"""GPU paths (skipped without CUDA): owner encoding, resident training and PEMA decoding on a CUDA device."""
from __future__ import annotations

import pytest
import torch

from pema.adapter.decode import GenerationSettings, generate
from pema.adapter.io import load_head
from pema.adapter.model import PemaAdapter
from pema.adapter.schedule import Schedule
from pema.config import load_config
from pema.formats.memory_writer import MemoryWriter
from pema.owner.encode import EncodeExample, MemoryEncoder
from pema.owner.export import export_head
from pema.owner.plm import tiny_model
from pema.owner.respond import ContextTap
from pema.executors.inline import InlineExecutor
from pema.stages.train import run_train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
VOCAB = 120


@pytest.fixture(scope="module")
def model():
    torch.backends.cuda.matmul.allow_tf32 = False
    return tiny_model("llama", VOCAB, seed=3).to("cuda")


def examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [EncodeExample(i, tuple(torch.randint(3, VOCAB, (5 + i % 4,), generator=g).tolist()),
                          tuple(torch.randint(3, VOCAB, (4 + i % 3,), generator=g).tolist())) for i in range(n)]


def write_memory(model, path, n, seed):
    rows = MemoryEncoder(model, key_dtype="float32")(examples(n, seed))
    with MemoryWriter(path, d=64, vocab_size=VOCAB, dtype="float32", model_id="tiny", model_revision=None,
                      tokenizer_hash="", template="", key_definition="") as w:
        w.add(**rows)
        w.close(num_examples=n, source_tokens=n * 6)
    return rows


def test_keys_on_gpu_reproduce_logits(model, tmp_path):
    ex = examples(3)
    rows = MemoryEncoder(model)(ex)
    export_head(model, tmp_path / "head", model_id="tiny")
    head, _ = load_head(tmp_path / "head")
    ids = torch.tensor([list(ex[0].prompt_ids + ex[0].target_ids[:-1])], device="cuda")
    with torch.no_grad():
        logits = model(ids).logits[0, len(ex[0].prompt_ids) - 1:].float().cpu()
    n = len(ex[0].target_ids)
    torch.testing.assert_close(head.from_key(torch.from_numpy(rows["key"][:n])), logits, atol=1e-4, rtol=1e-4)


def test_resident_training_on_gpu(model, tmp_path):
    write_memory(model, tmp_path / "memory" / "train", 40, 0)
    write_memory(model, tmp_path / "memory" / "dev", 10, 1)
    export_head(model, tmp_path / "head", model_id="tiny")
    cfg = load_config(None, ["resources.device=cuda", "train.resident=true", "adapter.rank=16", "adapter.alpha=16",
                             "train.rct_epochs=5", "train.epochs=3", "train.batch_size=32", "train.rct_solver=sgd"])
    info = run_train(cfg, tmp_path, InlineExecutor(), progress=False)  # the training stage's body on the GPU
    assert [p["phase"] for p in info.phases] == ["rct", "rct_pd"] and (tmp_path / "adapter").is_dir()
    import json

    rct = [h for h in json.loads((tmp_path / "train_history.json").read_text()) if h["phase"] == "rct"]
    assert rct[-1]["val_loss"] < rct[0]["val_loss"]


def test_pema_decoding_on_gpu(model, tmp_path):
    export_head(model, tmp_path / "head", model_id="tiny")
    head, _ = load_head(tmp_path / "head")
    head = head.to("cuda")
    torch.manual_seed(0)
    adapter = PemaAdapter(64, 16, 16.0, 0.0).cuda().eval()
    prompts = [list(e.prompt_ids) for e in examples(4)]
    settings = GenerationSettings(max_new_tokens=6, batch_size=4)
    plain = generate(model, prompts, stop_token_id=2, pad_token_id=0, settings=settings, progress=False)
    kw = dict(adapter=adapter, head=head, key_source=ContextTap(model), horizons=torch.full((4,), 5.0))
    zero = generate(model, prompts, stop_token_id=2, pad_token_id=0, settings=settings, progress=False,
                    schedule=Schedule("constant", lam=0.0), **kw)
    assert zero.token_ids == plain.token_ids
    gu = generate(model, prompts, stop_token_id=2, pad_token_id=0, settings=settings, progress=False,
                  schedule=Schedule("gu_quadratic", lam_max=1.0, floor=0.0), **kw)
    assert all(len(t) >= 1 for t in gu.lam_traces) and gu.lam_traces[0][0] == pytest.approx(1.0)
