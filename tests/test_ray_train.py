"""Ray Train on a real local cluster: 2 CPU workers with DDP lower the loss, and a worker killed mid-training is
restarted by Ray and resumes at the last checkpoint, running fewer steps and ending on the same adapter; the
workers' adapters agree at every validation (gradients are averaged)."""
import json
import os
from pathlib import Path

import pytest
import torch

from pema.adapter.io import load_adapter
from pema.config import load_config
from pema.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
OVERRIDES = ["train.num_workers=2", "train.cpus_per_worker=1", "train.rct_epochs=2", "train.epochs=2",
             "train.evals_per_epoch=2", "train.batch_size=32", "train.max_failures=1", "train.resident=true"]


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """memory/train, memory/dev and head/ of the smoke config, built in-process by the owner code (no Ray)."""
    from pema.owner.build import build_memory
    from pema.owner.export import export_head
    from pema.owner.plm import load_plm
    from pema.tasks import load_pairs, resolve_template, use_chat_template

    cfg = load_config(ROOT / "jobs/configs/smoke.yaml", OVERRIDES)
    out = tmp_path_factory.mktemp("ray_train")
    model, tok = load_plm(cfg.model.model_id)
    d = cfg.data
    kw = dict(model_id=cfg.model.model_id, model_revision=None, template=resolve_template(d.template),
              source_field=d.source_field, chat=use_chat_template(tok, cfg.model.prompt_format), progress=False,
              rows_per_part=cfg.memory.rows_per_part)
    fields = dict(source_field=d.source_field, target_field=d.target_field)
    m = build_memory(model, tok, load_pairs(ROOT / d.train, limit=d.train_limit, **fields), out / "memory/train", **kw)
    build_memory(model, tok, load_pairs(ROOT / d.dev, limit=d.dev_limit, **fields), out / "memory/dev", **kw)
    export_head(model, out / "head", model_id=cfg.model.model_id, model_revision=None, tokenizer_hash=m.tokenizer_hash)
    return cfg, out


def _copy_inputs(src: Path, dst: Path) -> Path:
    import shutil

    for name in ("head", "memory"):
        shutil.copytree(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def fresh_run(ray_client, stage_inputs, tmp_path_factory):
    from pema.integrations.ray_train import run_train_stage

    cfg, src = stage_inputs
    out = _copy_inputs(src, tmp_path_factory.mktemp("fresh"))
    seen = str(out / "seen")
    os.makedirs(seen)

    def record(rank, ckpt):  # every worker's adapter at every validation (pickled by value into the workers)
        torch.save({k: v.cpu() for k, v in ckpt.state.adapter.items()},
                   os.path.join(seen, f"{ckpt.phase_index}-{ckpt.state.step}-rank{rank}.pt"))

    return out, run_train_stage(cfg, out, progress=False, fault=record)


def test_two_ddp_workers_lower_the_loss(fresh_run):
    out, info = fresh_run
    assert info["workers"] == 2 and [p["phase"] for p in info["phases"]] == ["rct", "rct_pd"]
    assert info["steps_run"] == info["steps_total"] == sum(p["steps"] for p in info["phases"]) > 0
    history = json.loads((out / "train_history.json").read_text())
    for phase in ("rct", "rct_pd"):
        losses = [h["val_loss"] for h in history if h["phase"] == phase]
        assert len(losses) >= 3 and min(losses[1:]) < losses[0], (phase, losses)
    adapter, meta = load_adapter(out / "adapter")
    assert meta["config"]["rank"] == 16 and not list(out.glob("adapter.partial"))
    # DDP averages the gradients: both workers hold the same adapter at every validation, though each trains on
    # its own half of the memory
    checks = sorted({p.name.rsplit("-rank", 1)[0] for p in (out / "seen").glob("*.pt")})
    assert len(checks) >= 4
    for check in checks:
        a, b = (torch.load(out / "seen" / f"{check}-rank{r}.pt") for r in (0, 1))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=f"{check} {name}")


def test_killed_worker_resumes_from_checkpoint(fresh_run, stage_inputs, tmp_path):
    from pema.integrations.ray_train import run_train_stage

    fresh_out, fresh = fresh_run
    cfg, src = stage_inputs
    out = _copy_inputs(src, tmp_path / "run")
    marker = str(tmp_path / "crashed")

    def fault(rank, ckpt):  # pickled by value into the workers: kill rank 1 once, inside phase 2
        if rank == 1 and ckpt.phase_index == 1 and ckpt.state.step >= 2 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)

    info = run_train_stage(cfg, out, progress=False, fault=fault, run_name="crash")
    assert os.path.exists(marker), "the fault never fired: the test proves nothing"
    assert info["steps_total"] == fresh["steps_total"]
    assert 0 < info["steps_run"] < fresh["steps_total"]  # the restarted attempt skipped the steps before the crash
    resumed, _ = load_adapter(out / "adapter")
    reference, _ = load_adapter(fresh_out / "adapter")
    for name, value in reference.state_dict().items():  # same data, same steps, same order: the same adapter
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-6)


def test_too_many_workers_is_a_named_error(ray_client, stage_inputs, tmp_path):
    from pema.integrations.ray_train import run_train_stage

    cfg, src = stage_inputs
    out = _copy_inputs(src, tmp_path / "run")
    bad = load_config(ROOT / "jobs/configs/smoke.yaml", OVERRIDES + ["train.batch_size=1", "train.max_failures=0"])
    with pytest.raises(Exception, match="train.num_workers=2 is too many"):
        run_train_stage(bad, out, progress=False, run_name="bad")
    assert not (out / "adapter").exists()
