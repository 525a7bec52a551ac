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


class _Recorder:
    """Stands in for the relay actor: ``put.remote(key, line)`` records the line (no cluster needed)."""

    def __init__(self):
        self.lines: list[str] = []
        outer = self

        class _Put:
            @staticmethod
            def remote(key, line):
                outer.lines.append(line)

        class _Sync:
            @staticmethod
            def remote():
                return None

        self.put, self.sync = _Put, _Sync


def test_a_decoding_bar_ends_at_its_total():
    """The last frame the relay gets from a decoding bar is the finished count, also when every sequence finishes
    at once (within tqdm's mininterval, so no frame is drawn between 0% and the close)."""
    from pema.adapter.decode import sequence_bar
    from pema.executors.ray_progress import relayed_bars

    for total, steps in ((6, [6]), (5, [2, 2, 1]), (3, [1, 1, 1])):
        relay = _Recorder()
        with relayed_bars(relay, "decode_test_sets"):
            bar = sequence_bar(total, "zero_shot", True)
            for n in steps:
                bar.update(n)
            bar.close()
        assert relay.lines, "the bar drew nothing"
        last = relay.lines[-1]
        assert last.startswith("zero_shot:") and f"{total}/{total}" in last and "100%" in last, relay.lines
    relay = _Recorder()
    with relayed_bars(relay, "k"):
        sequence_bar(4, "off", False).close()
    assert relay.lines == []  # no progress, no bar
