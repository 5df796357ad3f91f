import io

import pytest

from pdm_jax.progress import Progress


class FakeClock:
    """A clock whose origin the test picks: perf_counter's is boot time, which varies."""

    def __init__(self, start: float):
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_a_log_stream_gets_no_repeated_final_line():
    out = io.StringIO()
    bar = Progress(1, "windows", "predicting", stream=out)
    bar.update()
    bar.close()
    assert len(out.getvalue().splitlines()) == 1


@pytest.mark.parametrize("origin", [0.0, 5.0, 1e7])
def test_close_reports_progress_made_since_the_last_line(origin):
    clock = FakeClock(origin)
    out = io.StringIO()
    bar = Progress(3, "steps", "training", stream=out, log_every_s=3600, clock=clock)
    bar.status = "loss 1.0"
    for _ in range(3):
        clock.now += 1.0
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("training: 1/3 steps"), "the first update is always shown"
    assert (
        len(lines) == 2 and lines[-1].startswith("training: 3/3 steps") and "loss 1.0" in lines[-1]
    )
    assert "(1.0 steps/s" in lines[-1]


def test_log_lines_are_spaced_by_log_every_s_whatever_the_clock_origin():
    clock = FakeClock(3.0)
    out = io.StringIO()
    bar = Progress(None, "it", "work", stream=out, log_every_s=10, clock=clock)
    for _ in range(25):
        clock.now += 1.0
        bar.update()
    assert [ln.split()[1] for ln in out.getvalue().splitlines()] == ["1", "11", "21"]
