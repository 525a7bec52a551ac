"""What decides where MLflow's UI opens the experiment, for the pinned MLflow (3.17.2).

The UI ignores the experiment's ``mlflow.experimentKind`` tag: its view follows its "GenAI | Model training" switch,
read from the URL's ``workflowType`` parameter, else from the browser's localStorage, default ``genai`` (the GenAI
overview, with no Model registry in the sidebar). The README's link (:func:`pema.tracking.runs.runs_table_url`)
carries ``workflowType=machine_learning``. The first test reads the installed UI bundle; the second opens the UI in
headless Chromium from a fresh profile (skipped without ``chromium``).
"""
import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bundle() -> str:
    import mlflow

    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    return "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(js.glob("*.js")))


def test_the_pinned_ui_follows_its_workflow_switch_and_the_readme_link_sets_it():
    import mlflow

    from pema.tracking.runs import MODEL_TRAINING_VIEW, runs_table_url

    assert mlflow.__version__ == "3.17.2", "the UI was checked for 3.17.2: check it again (test below) and the README"
    js = _bundle()
    # the switch: the URL parameter first, then localStorage, default genai
    assert 'key:"mlflow.workflowType",version:1,initialValue:' in js
    assert 'GENAI="genai",e.MACHINE_LEARNING="machine_learning"' in js
    assert '.get("workflowType")' in js
    # the experiment's kind comes from the switch whenever the workflow-based navigation is on (it is, in 3.17.2):
    # the tag is read only on the other branch
    assert '?m(t):(e=>{var t;return null===e||void 0===e||null===(t=e.find(e=>"mlflow.experimentKind"===e.key))' in js
    url = runs_table_url("http://127.0.0.1:5000/", "1")
    assert url == "http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
    assert MODEL_TRAINING_VIEW in (ROOT / "README.md").read_text(encoding="utf-8")


async def _open(url: str, want: tuple[str, ...], timeout: float = 90.0) -> tuple[str, str, bytes]:
    """``(location, page text, png)`` once the page shows every string of ``want`` (or at ``timeout``), in headless
    Chromium with a fresh profile, through the DevTools protocol."""
    import websockets

    from local_ray import free_port

    port, profile = free_port(), tempfile.mkdtemp(prefix="pema-ui-")
    proc = subprocess.Popen([shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
                             f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
                             "--window-size=1600,1000", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                tabs = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2))
                page = next(t for t in tabs if t["type"] == "page")
                break
            except Exception:
                assert time.monotonic() < deadline, "chromium's DevTools endpoint did not answer"
                time.sleep(0.3)
        async with websockets.connect(page["webSocketDebuggerUrl"], max_size=1 << 26) as ws:
            calls = iter(range(1, 1 << 30))

            async def call(method, **params):
                n = next(calls)
                await ws.send(json.dumps({"id": n, "method": method, "params": params}))
                while (msg := json.loads(await ws.recv())).get("id") != n:
                    pass
                return msg.get("result", {})

            async def value(expr):
                return (await call("Runtime.evaluate", expression=expr, returnByValue=True))["result"].get("value")

            await call("Page.navigate", url=url)
            end, text = time.monotonic() + timeout, ""
            while time.monotonic() < end:
                await asyncio.sleep(1)
                text = await value("document.body ? document.body.innerText : ''") or ""
                if all(w in text for w in want):
                    break
            await asyncio.sleep(1)
            shot = base64.b64decode((await call("Page.captureScreenshot", format="png"))["data"])
            return await value("location.href"), text, shot
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs headless chromium (apt-get install chromium)")
def test_a_fresh_browser_opens_the_runs_table_from_the_readme_link(mlflow_server, monkeypatch, tmp_path):
    pytest.importorskip("websockets")
    import mlflow

    from pema.tracking.runs import experiment_id, runs_table_url

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    exp = experiment_id("pema-ui-check")  # created as the jobs create theirs
    with mlflow.start_run(experiment_id=exp, run_name="pipeline"):
        mlflow.log_metric("pema/bleu", 1.0)

    where, text, shot = asyncio.run(_open(runs_table_url(mlflow_server, exp), ("pipeline", "Model registry")))
    (tmp_path / "runs.png").write_bytes(shot)
    assert f"/experiments/{exp}/runs" in where and "workflowType=machine_learning" in where, where
    assert "pipeline" in text and "Model registry" in text and "Model training" in text, text[:800]

    # the plain experiment link, from a fresh profile: the GenAI overview, whatever the tag says
    where, text, _ = asyncio.run(_open(f"{mlflow_server}/#/experiments/{exp}", ("Overview",), timeout=60))
    assert "/overview" in where and "Model registry" not in text, where
