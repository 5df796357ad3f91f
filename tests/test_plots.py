"""The run's plots (pdm_jax/plots.py, fed by pdm_jax/plotdata.py) and the p10-p90 coverage in
report.json."""

import json
import logging
import types

import numpy as np
import pytest
from PIL import Image

from pdm_jax import calibration, checkpoint, configuration, metrics, plotdata, plots, training
from pdm_jax.errors import ConfigError
from pdm_jax.models import layers
from pdm_jax.training import evaluation, state
from tests.conftest import load_config, tiny_cnn_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_real_png(path) -> None:
    """A PNG of a sensible size that shows something (not one flat colour)."""
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE, path
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    assert width > 300 and height > 300, (path, image.size)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 20, (path, len(colours))


def synthetic_report(quantiles: bool) -> dict:
    rng = np.random.default_rng(0)
    true = rng.uniform(5, 125, 40)
    pred = true + rng.normal(0, 15, 40)
    per_unit = []
    for i, (t, p) in enumerate(zip(true, pred, strict=True)):
        row = {"unit": i + 1, "true": float(t), "pred": float(p), "error": float(p - t)}
        if quantiles:
            row.update(p10=float(p - 20), p90=float(p + 20))
        per_unit.append(row)
    test = {**metrics.rul_metrics(pred, true)}
    if quantiles:
        test["coverage_p10_p90"] = 0.8
    return {"model": "tft", "best_step": 40, "test": test, "per_unit": per_unit}


def write_metrics(workdir) -> None:
    lines = [{"step": s, "loss": 100.0 / s, "lr": 1e-3} for s in range(10, 110, 10)]
    lines += [{"step": s, "val_rmse": 40.0 - s / 10, "val_mae": 30.0} for s in (20, 40, 60)]
    lines.append({"step": 100, "test_rmse": 20.0})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def trajectories(band: bool) -> list[plots.Trajectory]:
    out = []
    for unit, life in ((3, 80), (7, 150), (11, 200), (20, 60)):
        time = np.arange(1.0, life + 1)
        true = np.minimum(life - time + 10, 125.0)
        pred = true + np.sin(time / 7) * 8
        out.append(
            plots.Trajectory(
                unit, time, true, pred, pred - 15 if band else None, pred + 15 if band else None
            )
        )
    return out


def test_write_plots_from_a_synthetic_report(tmp_path):
    write_metrics(tmp_path)
    rng = np.random.default_rng(1)
    explanation = plots.Explanation(
        tuple(f"s_{i}" for i in range(14)),
        rng.dirichlet(np.ones(14)),
        np.tril(rng.uniform(size=(30, 30))),
    )
    files = plots.write_plots(
        str(tmp_path), synthetic_report(quantiles=True), trajectories(band=True), explanation
    )
    names = [p.rsplit("/", 1)[-1] for p in files]
    assert names == [
        "pred_vs_true.png",
        "error_hist.png",
        "trajectories.png",
        "tft_explain.png",
        "curves.png",
    ]
    for path in files:
        assert path.startswith(str(tmp_path / "plots"))
        assert_real_png(path)
    assert not list((tmp_path / "plots").glob("*.tmp*"))


def test_point_models_are_plotted_without_a_band(tmp_path):
    # The two plots that draw a band where there is one: without quantiles they still draw.
    plots.plot_pred_vs_true(synthetic_report(quantiles=False), str(tmp_path / "a.png"))
    plots.plot_trajectories(trajectories(band=False), str(tmp_path / "b.png"))
    assert_real_png(tmp_path / "a.png")
    assert_real_png(tmp_path / "b.png")


@pytest.fixture
def figures(monkeypatch) -> dict:
    """The figures the plots save, by file name, to read what they say."""
    seen: dict = {}
    save = plots._save

    def keep(fig, path, **kwargs):
        seen[path.rsplit("/", 1)[-1]] = fig
        save(fig, path, **kwargs)

    monkeypatch.setattr(plots, "_save", keep)
    return seen


def _texts(fig) -> str:
    parts = [t.get_text() for t in fig.texts]
    parts += [fig._suptitle.get_text()] if fig._suptitle else []
    for ax in fig.axes:
        parts += [t.get_text() for t in ax.texts] + [ax.get_title()]
        legend = ax.get_legend()
        parts += [t.get_text() for t in legend.get_texts()] if legend else []
    return "\n".join(parts)


def test_plots_say_what_they_show(tmp_path, figures):
    plots.plot_pred_vs_true(synthetic_report(quantiles=True), str(tmp_path / "p.png"))
    text = _texts(figures["p.png"])
    assert "late = predicted RUL above the true RUL: the costly side" in text
    assert "early: predicted below the truth" in text and "late: predicted above" in text
    plots.plot_trajectories(trajectories(band=True), str(tmp_path / "t.png"))
    fig = figures["t.png"]
    assert "chosen to span the range of true RUL at their last cycle" in _texts(fig)
    # One legend for the figure, outside the panels, instead of one inside the first panel.
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "p10-p90",
        "true RUL (capped)",
        "predicted",
    ]
    assert "unit 7, true RUL 10 at its last cycle" in _texts(fig)


def test_attention_colours_are_scaled_to_the_rows_with_a_choice(tmp_path, figures):
    """Causal attention: row 0 can only attend to itself (weight 1), rows near it to a few steps;
    scaled to the maximum, the rest of the map would be one dark colour."""
    t = 30
    visible = np.tril(np.ones((t, t)))
    uniform = visible / visible.sum(axis=1, keepdims=True)
    shown, vmax = plots.attention_view(uniform)
    assert np.isnan(shown[np.triu_indices(t, 1)]).all()  # later steps: not visible
    assert vmax == pytest.approx(1 / 8)  # the widest weight among rows 7..29 (row 7 sees 8)
    assert shown[0, 0] == 1.0 > vmax
    explanation = plots.Explanation(tuple(f"s_{i}" for i in range(5)), np.ones(5) / 5, uniform)
    plots.plot_tft_explain(explanation, str(tmp_path / "x.png"))
    text = _texts(figures["x.png"])
    assert "each row: the prediction made at that cycle" in text
    assert_real_png(tmp_path / "x.png")


def test_cmapss_inputs_are_labelled_with_what_they_measure():
    names = ("s_9", "s_11", "time", "s_9-baseline")
    assert evaluation.input_labels("cmapss", names) == (
        "s_9 Nc (core speed)",
        "s_11 Ps30 (HPC outlet static pressure)",
        "time (age in cycles)",
        "s_9 Nc (core speed), change since early life",
    )
    assert evaluation.input_labels("csv", ("s_9", "vib")) == ("s_9", "vib")


def test_write_plots_skips_what_it_has_no_inputs_for(tmp_path):
    # --mode=train or data without test truth: no per-unit errors, no metrics yet.
    assert plots.write_plots(str(tmp_path), {"model": "cnn_bilstm"}) == []
    write_metrics(tmp_path)
    files = plots.write_plots(str(tmp_path), {"model": "cnn_bilstm"})
    assert [p.rsplit("/", 1)[-1] for p in files] == ["curves.png"]


def test_interval_columns_and_coverage():
    assert metrics.interval_columns((0.1, 0.5, 0.9)) == (0, 2)
    assert metrics.interval_columns((0.9, 0.5, 0.1)) == (2, 0)
    assert metrics.interval_columns((0.05, 0.5, 0.95)) is None
    assert metrics.interval_columns(()) is None
    low, high = np.array([0.0, 0.0, 5.0, 3.0]), np.array([10.0, 10.0, 6.0, 1.0])
    assert metrics.interval_coverage(low, high, np.array([0.0, 10.0, 7.0, 2.0])) == 0.5
    d = np.array([-13.0, 0.0, 10.0])
    np.testing.assert_allclose(metrics.phm08_penalty(d), [np.e - 1, 0.0, np.e - 1])


def test_a_plot_failure_never_loses_the_run(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no ink")

    monkeypatch.setattr(plotdata, "run_plots", broken)
    config = load_config("cnn_bilstm")
    prepared = types.SimpleNamespace(
        test=None, val=None, scaler=types.SimpleNamespace(features=("s_2",)), inputs=("s_2",)
    )
    run = types.SimpleNamespace(
        primary=True, config=config, prepared=prepared, graphdef=None, spec=None
    )
    with caplog.at_level(logging.WARNING, logger="pdm_jax.training"):
        assert evaluation.write_plots(run, str(tmp_path), {}, params=None) == []
    assert "plots not written: RuntimeError: no ink" in caplog.text
    config.train.plots = False  # off: nothing is attempted
    caplog.clear()
    assert evaluation.write_plots(run, str(tmp_path), {}, params=None) == []
    assert "plots not written" not in caplog.text


def tiny_run(cfg, steps: int = 4):
    cfg.train.num_steps = steps
    cfg.train.batch_size = 32
    cfg.train.eval_every = 2
    cfg.train.log_every = 1
    cfg.train.warmup_steps = 1
    cfg.train.tensorboard = False
    cfg.data.window = 10
    return cfg


def test_training_writes_the_plots(tmp_path):
    cfg = tiny_run(tiny_cnn_config())
    cfg.train.select_on = "degrading"
    result = training.train_and_evaluate(cfg, str(tmp_path))
    # Selection scored the windows below the cap: the best step is the one where that was lowest.
    evals = [r for r in summaries_rows(tmp_path) if "val_rmse" in r]
    assert all(r["val_rmse_degrading"] != r["val_rmse"] for r in evals)
    best = min(evals, key=lambda r: r["val_rmse_degrading"])
    assert result["select_on"] == "degrading" and result["best_step"] == best["step"]
    assert result["val_rmse"] == pytest.approx(best["val_rmse_degrading"])
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["curves.png", "error_hist.png", "pred_vs_true.png", "trajectories.png"]
    for name in plots:
        assert_real_png(tmp_path / "plots" / name)
    # A point model gets its band from the validation units (split conformal): the report
    # scores it on the test units like a quantile model's.
    units = result["per_unit"]
    inside = [u["p10"] <= u["true"] <= u["p90"] for u in units]
    assert result["test"]["coverage_p10_p90"] == pytest.approx(np.mean(inside))
    assert "coverage_p10_p90_raw" not in result["test"]  # no band of its own to compare
    assert all(u["p10"] <= u["pred"] <= u["p90"] for u in units)
    assert result["calibration"]["step"] == result["best_step"]
    assert sum(b["windows"] for b in result["calibration"]["bins"]) > 0


def summaries_rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_degrading_rmse_leaves_out_windows_at_the_cap():
    true = np.array([125.0, 125.0, 80.0, 20.0])
    val = {"pred": np.array([125.0, 125.0, 90.0, 10.0]), "true": true, "rmse": 7.07}
    assert evaluation.degrading_rmse(val, 125.0) == pytest.approx(10.0)
    assert evaluation.degrading_rmse(val, 0.0) == 7.07  # uncapped: every window counts
    assert evaluation.degrading_rmse({**val, "true": np.full(4, 125.0)}, 125.0) == 7.07
    cfg = load_config("cnn_bilstm")
    cfg.train.select_on = "best"
    with pytest.raises(ConfigError, match=r"^config.train.select_on: expected one of"):
        configuration.validate(cfg)
    # Checkpoints from before the key select on all windows, as the default does.
    saved = load_config("cnn_bilstm").to_dict()
    del saved["train"]["select_on"]
    cfg.train.select_on = "all"
    assert checkpoint.config_differences(saved, cfg.to_dict()) == []
    cfg.train.select_on = "degrading"
    assert checkpoint.config_differences(saved, cfg.to_dict()) == ["train.select_on"]


def test_calibration_none_leaves_a_point_model_without_a_band():
    cfg = load_config("cnn_bilstm")
    val = {"outputs": np.zeros((300, 1)), "pred": np.zeros(300), "true": np.ones(300)}
    spec = layers.spec_from_config(cfg.model, 14, 30)
    assert evaluation.fit_calibration(cfg, spec, val, 5).step == 5
    cfg.train.calibration = "none"
    assert evaluation.fit_calibration(cfg, spec, val, 5) is None
    cfg.train.calibration = "isotonic"
    with pytest.raises(ConfigError, match=r"^config.train.calibration: expected one of"):
        configuration.validate(cfg)


def test_a_checkpoints_band_is_dropped_when_calibration_is_off():
    cfg = load_config("cnn_bilstm")
    cal = calibration.Calibration((0.1, 0.9), (50.0,), (1.0, 2.0), (3.0, 4.0), (10, 20), step=7)
    meta = {"calibration": cal.to_dict()}
    assert state.saved_calibration(meta, cfg) == cal
    assert state.saved_calibration({}, cfg) is None  # format 1: none saved
    cfg.train.calibration = "none"  # resumed or evaluated with it off: no band reported
    assert state.saved_calibration(meta, cfg) is None


def test_tft_run_reports_coverage_and_explains_itself(tmp_path, caplog, figures):
    cfg = tiny_run(load_config("tft"))
    cfg.data.val_fraction = 0.0  # no validation: one predict compile fewer (the CNN run has it)
    cfg.model.tft.hidden = 8
    cfg.model.tft.heads = 2
    cfg.model.tft.var_hidden = 4
    with caplog.at_level(logging.INFO, logger="pdm_jax.training"):
        training.train_and_evaluate(cfg, str(tmp_path))
    explained = figures["tft_explain.png"].axes[0]
    assert "s_9 Nc (core speed)" in [t.get_text() for t in explained.get_yticklabels()]
    saved = json.loads((tmp_path / "report.json").read_text())
    # No validation units, no calibration: the band is the model's own quantiles, and says so.
    assert "calibration" not in saved and "coverage_p10_p90_raw" not in saved["test"]
    assert "no calibrated p10-p90 band: no validation units" in caplog.text
    coverage = saved["test"]["coverage_p10_p90"]
    units = saved["per_unit"]
    inside = [u["p10"] <= u["true"] <= u["p90"] for u in units]
    assert coverage == pytest.approx(np.mean(inside)) and 0.0 <= coverage <= 1.0
    assert all(set(u) == {"unit", "true", "pred", "error", "p10", "p90"} for u in units)
    assert all(u["p10"] <= u["pred"] <= u["p90"] for u in units)  # the raw heads are held too
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert "tft_explain.png" in plots and "trajectories.png" in plots
    assert_real_png(tmp_path / "plots" / "tft_explain.png")
