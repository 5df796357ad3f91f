"""scripts/lower.py: the real train and predict steps, laid out as `main` would lay them out on
each recorded GPU/TPU target, lower for that platform from this CPU; what they compute there
is checked by running the exported predict step back here.

Models are shrunk (tiny widths) to keep compiles short; every code path is the real one. The
exports here use an AbstractMesh of the target's shape, so one CPU device lowers for 16; the
one subprocess runs the script as a user would, on 16 fake CPU devices for a v4-32.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from pdm_jax import configuration, parallel, prediction
from pdm_jax.hardware import targets
from tests.conftest import REPO

lower = configuration.load_module(REPO / "scripts" / "lower.py")
CNN_CONFIG = REPO / "configs" / "cnn_bilstm.py"

TINY = {
    "tft": {"model.tft.hidden": 8, "model.tft.heads": 2, "model.tft.var_hidden": 4},
    "cnn_bilstm": {
        "model.cnn_bilstm.channels": (8,),
        "model.cnn_bilstm.dilations": (1,),
        "model.cnn_bilstm.lstm_hidden": 8,
        "model.cnn_bilstm.dense": 8,
    },
}
# --config file for the script: configs/<model>.py with the TINY widths.
TINY_CONFIG = """
from pdm_jax.configuration import load_config


def get_config():
    config = load_config({model!r})
    for key, value in {values!r}.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config
"""


def tiny_config(model: str, dtype: str = "auto") -> object:
    args = argparse.Namespace(model=model, target=None, dtype=dtype, config=None)
    config = lower.load_config(args)
    for key, value in TINY[model].items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def abstract_mesh(shape: tuple[int, int]) -> AbstractMesh:
    return AbstractMesh(
        tuple(shape), (parallel.DATA, parallel.MODEL), axis_types=(AxisType.Auto, AxisType.Auto)
    )


def argument_shardings(exported: jax.export.Exported) -> dict[str, str]:
    """The exported module's arguments: pytree path (its `loc`) -> Shardy sharding per dim."""
    text = exported.mlir_module()
    signature = re.search(r"func\.func public @main\((.*?)\) ->", text, re.S).group(1)
    found = {}
    for arg in re.split(r"(?=%arg\d+: )", signature):
        sharding = re.search(r"#sdy\.sharding<@mesh, (\[.*?\])>", arg)
        name = re.search(r'loc\("([^"]+)"\)', arg)
        if sharding and name:
            found[name.group(1)] = sharding.group(1)
    return found


@pytest.mark.parametrize("target", list(targets.TARGETS))
@pytest.mark.parametrize("model", ["tft", "cnn_bilstm"])
def test_both_steps_lower_for_every_target_with_its_layout(model, target):
    machine = targets.target(target)
    chosen = lower.plan(tiny_config(model), machine)
    layout, devices = chosen.layout, machine.num_devices
    assert layout.mesh_shape == (devices, 1)  # auto: every device data-parallel
    assert layout.per_device_batch * devices * layout.grad_accum == layout.global_batch
    assert layout.dtype == "bfloat16"  # auto on A100, H100, TPU v5e and v4
    steps = lower.build_steps(chosen.config, layout, abstract_mesh(layout.mesh_shape))
    train, predict = lower.export(steps, [machine.platform])
    for exported in (train, predict):
        assert exported.platforms == (machine.platform,)
        assert exported.nr_devices == devices
        assert "bf16" in exported.mlir_module()  # computed in bf16 ...
    # ... from fp32 parameters and optimizer state
    assert {a.dtype for a in jax.tree.leaves(train.in_avals[:2])} == {jnp.dtype("float32")}
    shardings = argument_shardings(train)
    batch = {k: v for k, v in shardings.items() if k.startswith("batch[")}
    assert set(batch) == {"batch['x']", "batch['mask']", "batch['y']"}
    assert all(v.startswith('[{"data"}') for v in batch.values()), batch
    state = [v for k, v in shardings.items() if k.startswith(("params", "opt_state"))]
    assert state and all('"data"' not in v for v in state)  # replicated
    inputs = {k: v for k, v in argument_shardings(predict).items() if k.startswith("batch[")}
    assert inputs and all(v.startswith('[{"data"}') for v in inputs.values()), inputs


# bf16 against the fp32 path, in cycles of RUL: bf16 keeps 8 significant bits, so one rounding
# moves a value by up to 2^-9 (0.2 %) of itself, and a few layers of them accumulate; outputs
# reach ~115 cycles here (target_offset 60 plus the scaled head). Allowed: 1 % of the value plus
# half a cycle (measured: 0.71 cycles at most on the tiny TFT, 0.03 on the CNN-BiLSTM), well
# under the models' ~10-cycle test RMSE.
BF16_RTOL, BF16_ATOL_CYCLES = 1e-2, 0.5


@pytest.mark.parametrize("model", ["tft", "cnn_bilstm"])
def test_exported_predict_step_runs_back_on_cpu_with_the_cpu_paths_numbers(model):
    """Exported for the GPU and CPU together (jax.export only runs a module on a platform it was
    lowered for), then run here from its serialized StableHLO (`Exported.call`)."""
    machine = targets.target("a100")
    mesh = parallel.make_mesh((1, 1), jax.devices()[:1])
    results, reference = {}, None
    for dtype in ("float32", "bfloat16"):
        chosen = lower.plan(tiny_config(model, dtype), machine)
        steps = lower.build_steps(chosen.config, chosen.layout, mesh)
        exported = jax.export.export(steps.predict, platforms=("cuda", "cpu"))(*steps.predict_args)
        assert exported.platforms == ("cuda", "cpu")
        windows, size = steps.prepared.val, steps.predict_args[1]["x"].shape[0]
        inputs = prediction.model_inputs(windows.gather(np.arange(size) % len(windows)))
        results[dtype] = np.asarray(exported.call(steps.params, inputs)["point"])
        if dtype == "float32":
            cpu_path = prediction.make_predict_step(steps.graphdef, steps.spec)
            reference = np.asarray(cpu_path(steps.params, inputs)["point"])
    np.testing.assert_allclose(results["float32"], reference, rtol=1e-5)
    np.testing.assert_allclose(
        results["bfloat16"], reference, rtol=BF16_RTOL, atol=BF16_ATOL_CYCLES
    )
    assert not np.array_equal(results["bfloat16"], reference)  # it did compute in bf16


def test_compiled_cost_counts_each_loop_body_once_per_iteration():
    """XLA's cost analysis counts a while loop's body once; the LSTM scans would vanish."""

    def nested(x, w):
        def outer(c, _):
            inner = jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), c, None, length=3)
            return inner[0], None

        return jax.lax.scan(outer, x, None, length=10)[0].sum()

    def unrolled(x, w):
        for _ in range(30):
            x = jnp.tanh(x @ w)
        return x.sum()

    x, w = jnp.ones((64, 128)), jnp.ones((128, 128))
    cost = lower.compiled_cost(jax.jit(nested).lower(x, w).compile())
    plain = jax.jit(unrolled).lower(x, w).compile().cost_analysis()
    assert cost["flops"] == pytest.approx(plain["flops"], rel=1e-3)
    assert (cost["loops"], cost["loop_iterations"], cost["unknown_trips"]) == (2, 40, 0)


def test_roofline_is_the_slower_of_compute_and_memory():
    v5e = targets.target("tpu_v5e_8")
    assert v5e.roofline(197e12, 1.0, "bfloat16") == (pytest.approx(1.0), "compute")
    assert v5e.roofline(1.0, 819e9, "float32") == (pytest.approx(1.0), "memory")
    a100 = targets.target("a100")
    assert a100.peak_flops("float32") < a100.peak_flops("bfloat16")
    assert a100.roofline(19.5e12, 1.0, "float32") == (pytest.approx(1.0), "compute")
    assert targets.target("tpu_v4_32").snapshot().process_count == 4
    with pytest.raises(ValueError, match="tpu_v5e_8"):
        targets.target("v100")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model=tft", "--target=tpu_v9"], "argument --target: invalid choice: 'tpu_v9'"),
        (["--model=mlp", "--target=a100"], "argument --model: invalid choice: 'mlp'"),
        (["--model=tft", "--target=a100", "--dtype=float16"], "argument --dtype"),
        (["--target=a100"], "the following arguments are required: --model"),
        (["--model=tft", "--target=a100", "--config=nowhere.py"], "--config: nowhere.py"),
        (["--model=tft", "--target=a100", f"--config={CNN_CONFIG}"], "not --model=tft"),
        (["--model=tft", "--target=tpu_v4_32"], "needs 16 devices and jax has"),
    ],
)
def test_bad_flags_are_one_error_line_and_exit_code_2(argv, message, capsys):
    assert lower.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err


KEYS = {
    "model",
    "target",
    "platform",
    "mesh",
    "dtype",
    "per_device_batch",
    "grad_accum",
    "remat",
    "lowered",
    "flops_per_step",
    "bytes_per_step",
    "est_step_ms",
    "est_samples_per_s",
    "bound",
}


def test_script_lowers_for_a_v4_32_on_16_fake_cpu_devices(tmp_path):
    config = tmp_path / "tiny_cnn.py"
    config.write_text(TINY_CONFIG.format(model="cnn_bilstm", values=TINY["cnn_bilstm"]))
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/lower.py",
            "--model=cnn_bilstm",
            "--target=tpu_v4_32",
            f"--config={config}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = proc.stdout.strip().splitlines()
    record = json.loads(line)
    assert set(record) >= KEYS
    assert (record["model"], record["target"], record["platform"]) == (
        "cnn_bilstm",
        "tpu_v4_32",
        "tpu",
    )
    assert (record["devices"], record["processes"], record["mesh"]) == (16, 4, [16, 1])
    assert (record["dtype"], record["per_device_batch"], record["grad_accum"]) == (
        "bfloat16",
        16,
        1,
    )
    assert record["lowered"] is True and record["bound"] in ("compute", "memory")
    assert record["flops_per_step"] > 0 and record["bytes_per_step"] > 0
    assert record["loop_iterations"] >= 2 * 50  # the LSTM's forward and backward scans
    assert record["est_samples_per_s"] == pytest.approx(256 / record["est_step_ms"] * 1e3, rel=1e-3)
    assert record["collectives"]["all-reduce"] >= 1  # the gradients
    # The batch stays split through the LSTM: no activation is gathered over the global batch
    # (a [T*B, .] reshape of time-major arrays made the partitioner gather them).
    assert set(record["collectives"]) == {"all-reduce"}, record["collectives"]
