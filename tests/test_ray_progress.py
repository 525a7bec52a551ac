"""Progress bars drawn by a stage body inside a Ray task reach the driver's console through the relay actor, with
Ray's own log forwarding off (the test process connects with ``log_to_driver=False``)."""
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


def test_a_task_bar_is_redrawn_on_the_driver(ray_client, capfd):
    from pema.executors.ray_executor import RayExecutor

    def work(n):  # nested: pickled by value into the worker
        import sys
        import time

        from tqdm.auto import tqdm

        for _ in tqdm(range(n), desc="relay check", mininterval=0, file=None):
            time.sleep(0.05)
        print("plain stderr line", file=sys.stderr)
        return n

    assert RayExecutor(progress=True).call(work, 12) == 12
    err = capfd.readouterr().err
    assert "relay check" in err and "12/12" in err  # the finished bar, redrawn here
    assert "plain stderr line" not in err  # other worker output is not relayed (Ray's forwarding is off)
    assert RayExecutor(progress=False).call(work, 3) == 3
    assert "relay check" not in capfd.readouterr().err  # no relay, no bar
