"""LoRA reference baseline (pema.owner.lora) and the peak-memory meter (pema.profiling).

A tiny random Llama with SmolLM2's tokenizer; its untied LM head is scaled x10 so that the logits have room to move
(at init they are ~0.2 wide and the loss cannot fall far below log(vocab))."""
from __future__ import annotations

import copy
import time

import pytest
import torch

from pema.formats import tasks
from pema.config import config_from_dict
from pema.owner.lora import IGNORE, batch_loss, collate, load_lora, lora_examples, save_lora, train_lora
from pema.owner.plm import tiny_model
from pema.stages.decode import translate
from pema.profiling import PeakMemory
from test_owner import PAIRS  # the same five pairs

LORA = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["all-linear"], "epochs": 8, "lr": 1e-2,
        "batch_size": 2, "seed": 0}


def make_cfg(prompt_format="auto", **lora):
    return config_from_dict({"model": {"model_id": "tiny://llama", "prompt_format": prompt_format},
                             "lora": {**LORA, **lora}, "decode": {"max_new_tokens": 4, "batch_size": 2}})


def fresh_model(tokenizer):
    model = tiny_model("llama", len(tokenizer), seed=0, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


def base_name(name: str) -> str:
    """PEFT's parameter name -> the base model's: drop the wrapper prefix and ``.base_layer``."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


@pytest.fixture(scope="module")
def trained(smollm2_tokenizer):
    model = fresh_model(smollm2_tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reports = []
    result = train_lora(model, smollm2_tokenizer, PAIRS, make_cfg(), progress=False, report=reports.append)
    return result, before, reports


@pytest.mark.parametrize("prompt_format", ["chat", "raw"])
def test_labels_are_the_memory_targets(smollm2_tokenizer, prompt_format):
    tok, cfg = smollm2_tokenizer, make_cfg(prompt_format)
    chat = prompt_format == "chat"
    stop = tasks.stop_token_id(tok, chat=chat)
    data = lora_examples(tok, PAIRS, cfg)
    assert len(data) == len(PAIRS)
    for pair, (ids, labels) in zip(PAIRS, data):
        prompt = tasks.source_prompt_ids(tok, tasks.TEMPLATES["wmt22_en_de"], pair.source, source_field="en", chat=chat)
        target = tasks.target_ids(tok, pair.target, chat=chat)
        assert ids == prompt + target and len(labels) == len(ids)
        assert labels[: len(prompt)] == [IGNORE] * len(prompt)
        assert labels[len(prompt):] == target and target[-1] == stop  # the stop token is a target too


def naive_loss(model, tokenizer, pairs, chat: bool) -> torch.Tensor:
    """Mean CE over every target token of ``pairs``: one unpadded forward per example, logits at position P - 1 + t
    predict target token t (the memory's key positions), -log_softmax picked by hand."""
    nll = []
    with torch.no_grad():
        for pair in pairs:
            prompt = tasks.source_prompt_ids(tokenizer, tasks.TEMPLATES["wmt22_en_de"], pair.source, source_field="en",
                                             chat=chat)
            target = tasks.target_ids(tokenizer, pair.target, chat=chat)
            logits = model(torch.tensor([prompt + target])).logits[0].double()
            for t, y in enumerate(target):
                nll.append(-torch.log_softmax(logits[len(prompt) - 1 + t], -1)[y])
    return torch.stack(nll).mean()


def test_loss_equals_naive_reference(smollm2_tokenizer):
    tok = smollm2_tokenizer
    model = fresh_model(tok)
    reference = naive_loss(model, tok, PAIRS, chat=True)
    # padded batch through the same function the training loop calls, on the base model
    batch = collate(lora_examples(tok, PAIRS, make_cfg()), pad_id=0)
    with torch.no_grad():
        assert float(batch_loss(model, batch).loss) == pytest.approx(float(reference), abs=1e-5)
    # first training step: lora_B starts at zero, so the wrapped model's first loss is the base model's
    reports = []
    train_lora(model, tok, PAIRS, make_cfg(batch_size=len(PAIRS), epochs=1, dropout=0.1), progress=False,
               report=reports.append)
    assert reports[0]["loss"] == pytest.approx(float(reference), abs=1e-5)


def test_loss_falls(trained):
    result, _, reports = trained
    steps = LORA["epochs"] * -(-len(PAIRS) // LORA["batch_size"])
    assert len(result.losses) == len(reports) == steps
    assert [r["step"] for r in reports] == list(range(1, steps + 1)) and reports[-1]["epoch"] == LORA["epochs"] - 1
    assert len(result.epoch_losses) == LORA["epochs"]
    assert result.epoch_losses[-1] < result.epoch_losses[0] - 2.0, result.epoch_losses  # measured 12.0 -> ~5.5


def test_only_adapter_weights_change(trained):
    result, before, _ = trained
    after = {base_name(n): p for n, p in result.model.named_parameters() if "lora_" not in n}
    assert after.keys() == before.keys()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert not changed, f"base weights changed: {changed}"
    lora_b = {n: p for n, p in result.model.named_parameters() if "lora_B" in n}
    assert lora_b and all(bool(p.abs().sum() > 0) for p in lora_b.values())  # every B left zero
    lora = sum(p.numel() for n, p in result.model.named_parameters() if "lora_" in n)
    assert result.trainable_params == lora > 0
    assert result.total_params == lora + sum(p.numel() for p in before.values())
    assert result.train_seconds > 0 and result.tokens_per_s > 0 and result.peak_bytes >= 0
    assert result.memory_kind == "cpu_rss"


def test_decode_save_load_and_merge(trained, smollm2_tokenizer, tmp_path):
    result, _, _ = trained
    tok, cfg = smollm2_tokenizer, make_cfg()
    assert not result.model.training
    hyps, gen = translate(result.model, tok, [p.source for p in PAIRS[:3]], cfg)
    assert len(hyps) == 3 and all(isinstance(h, str) for h in hyps) and len(gen.token_ids) == 3
    probe = torch.tensor([tasks.source_prompt_ids(tok, tasks.TEMPLATES["wmt22_en_de"], "Good morning.",
                                                  source_field="en", chat=True)])
    with torch.no_grad():
        want = result.model(probe).logits
        base = fresh_model(tok)(probe).logits
    assert (want - base).abs().max() > 1e-3  # the adapter does something
    out = save_lora(result, tmp_path / "lora")
    assert (out / "adapter_model.safetensors").is_file() and not list(out.glob("*.bin"))
    loaded = load_lora(fresh_model(tok), out)
    merged = copy.deepcopy(result).merged()
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(probe).logits, want, rtol=0, atol=1e-4)


def test_bad_inputs(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    with pytest.raises(ValueError, match=r"\['q_projx'\].*'q_proj'"):
        train_lora(fresh_model(tok), tok, PAIRS, make_cfg(target_modules=["q_proj", "q_projx"]), progress=False)
    with pytest.raises(ValueError, match="pairs is empty"):
        train_lora(fresh_model(tok), tok, [], make_cfg(), progress=False)
    with pytest.raises(ValueError, match="pairs is empty"):
        lora_examples(tok, [], make_cfg())
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        load_lora(fresh_model(tok), tmp_path)


def test_already_wrapped_model_is_refused(trained, smollm2_tokenizer):
    with pytest.raises(ValueError, match="already a PeftModel"):
        train_lora(trained[0].model, smollm2_tokenizer, PAIRS, make_cfg(), progress=False)


def test_peak_memory_cpu_sees_a_200mb_tensor():
    size = 200 * 2**20
    with PeakMemory("cpu") as pm:
        x = torch.ones(size // 4)  # float32, every page touched
        time.sleep(0.1)  # ten sampling intervals while it lives
        del x
    assert pm.kind == "cpu_rss" and pm.baseline_bytes > 0
    assert 0.75 * size < pm.peak_bytes < 1.5 * size, pm.peak_bytes  # RSS: other allocations and caching add noise


def test_peak_memory_bad_interval():
    with pytest.raises(ValueError, match="interval_s"):
        PeakMemory("cpu", interval_s=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_cuda():
    size = 64 * 2**20
    with PeakMemory("cuda") as pm:
        x = torch.ones(size // 4, device="cuda")
        del x
    assert pm.kind == "cuda_allocated" and pm.peak_bytes == size
