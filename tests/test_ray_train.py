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

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
OVERRIDES = ["resources.train_workers=2", "resources.cpus_per_worker=1", "train.rct_epochs=2", "train.epochs=2",
             "train.evals_per_epoch=2", "train.batch_size=32", "train.max_failures=1", "train.resident=true"]


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """memory/train, memory/dev and head/ of the smoke config, built by the build stage inline (no Ray)."""
    from pema.config import with_absolute_data
    from pema.executors.inline import InlineExecutor
    from pema.stages.build import run_build

    cfg = with_absolute_data(load_config(ROOT / "jobs/configs/smoke.yaml", OVERRIDES))
    out = tmp_path_factory.mktemp("ray_train")
    run_build(cfg, out, InlineExecutor(), progress=False)
    return cfg, out


def _copy_inputs(src: Path, dst: Path) -> Path:
    import shutil

    for name in ("head", "memory"):
        shutil.copytree(src / name, dst / name)
    return dst


def spied_executor(spy):
    """The Ray executor, its training body wrapped so that ``spy(rank, metrics, checkpoint_writer)`` sees every
    log of every worker first (nested, so that Ray pickles it by value into the workers)."""
    from pema.executors.ray_executor import RayExecutor
    from pema.executors.ray_train import train_on_ray

    def body(config, ctx):
        from pema.stages.train import train_worker

        inner = ctx.logger

        class Spy:
            def log_metrics(self, metrics, step=None, *, checkpoint=None):
                spy(ctx.rank, metrics, checkpoint)
                inner.log_metrics(metrics, step, checkpoint=checkpoint)

        ctx.logger = Spy()
        return train_worker(config, ctx)

    class Spied(RayExecutor):
        def train(self, _body, config, *, cfg, layout):
            return train_on_ray(body, config, cfg=cfg, layout=layout)

    return Spied()


def run_spied(cfg, out, spy):
    from pema.stages.train import run_train

    return run_train(cfg, out, spied_executor(spy), progress=False)


@pytest.fixture(scope="module")
def fresh_run(ray_client, stage_inputs, tmp_path_factory):
    cfg, src = stage_inputs
    out = _copy_inputs(src, tmp_path_factory.mktemp("fresh"))
    seen = str(out / "seen")
    os.makedirs(seen)

    def record(rank, metrics, writer):  # every worker's adapter at every validation
        if not metrics.get("done"):
            writer(os.path.join(seen, f"{metrics['phase_index']}-{metrics['step']}-rank{rank}"))

    return out, run_spied(cfg, out, record)


def test_two_ddp_workers_lower_the_loss(fresh_run):
    from pema.adapter.checkpoint import load_checkpoint

    out, info = fresh_run
    assert info.workers == 2 and [p["phase"] for p in info.phases] == ["rct", "rct_pd"]
    assert info.steps_run == info.steps_total == sum(p["steps"] for p in info.phases) > 0
    history = json.loads((out / "train_history.json").read_text())
    for phase in ("rct", "rct_pd"):
        losses = [h["val_loss"] for h in history if h["phase"] == phase]
        assert len(losses) >= 3 and min(losses[1:]) < losses[0], (phase, losses)
    adapter, meta = load_adapter(out / "adapter")
    assert meta["config"]["rank"] == 16 and not list(out.glob("adapter.partial"))
    # DDP averages the gradients: both workers hold the same adapter at every validation, though each trains on
    # its own half of the memory
    checks = sorted({p.name.rsplit("-rank", 1)[0] for p in (out / "seen").iterdir()})
    assert len(checks) >= 4
    for check in checks:
        a, b = (load_checkpoint(out / "seen" / f"{check}-rank{r}").state.adapter for r in (0, 1))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=f"{check} {name}")


def test_killed_worker_resumes_from_checkpoint(fresh_run, stage_inputs, tmp_path):
    fresh_out, fresh = fresh_run
    cfg, src = stage_inputs
    out = _copy_inputs(src, tmp_path / "run")
    marker = str(tmp_path / "crashed")

    def fault(rank, metrics, writer):  # kill rank 1 once, inside phase 2
        if (rank == 1 and metrics.get("phase_index") == 1 and metrics.get("step", 0) >= 2
                and not os.path.exists(marker)):
            open(marker, "w").close()
            os._exit(1)

    info = run_spied(cfg, out, fault)
    assert os.path.exists(marker), "the fault never fired: the test proves nothing"
    assert info.steps_total == fresh.steps_total
    assert 0 < info.steps_run < fresh.steps_total  # the restarted attempt skipped the steps before the crash
    resumed, _ = load_adapter(out / "adapter")
    reference, _ = load_adapter(fresh_out / "adapter")
    for name, value in reference.state_dict().items():  # same data, same steps, same order: the same adapter
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-6)


def test_too_many_workers_is_a_named_error(ray_client, stage_inputs, tmp_path):
    from pema.executors.ray_executor import RayExecutor
    from pema.stages.train import run_train

    cfg, src = stage_inputs
    out = _copy_inputs(src, tmp_path / "run")
    bad = load_config(ROOT / "jobs/configs/smoke.yaml", OVERRIDES + ["train.batch_size=1", "train.max_failures=0"])
    with pytest.raises(Exception, match="resources.train_workers=2 is too many"):
        run_train(bad, out, RayExecutor(), progress=False)
    assert not (out / "adapter").exists()
