import io

from pdm_jax.progress import Progress


def test_a_log_stream_gets_no_repeated_final_line():
    out = io.StringIO()
    bar = Progress(1, "windows", "predicting", stream=out)
    bar.update()
    bar.close()
    assert len(out.getvalue().splitlines()) == 1


def test_close_reports_progress_made_since_the_last_line():
    out = io.StringIO()
    bar = Progress(3, "steps", "training", stream=out, log_every_s=3600)
    bar.status = "loss 1.0"
    for _ in range(3):
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert (
        len(lines) == 2 and lines[-1].startswith("training: 3/3 steps") and "loss 1.0" in lines[-1]
    )
