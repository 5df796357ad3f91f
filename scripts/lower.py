"""Lower the real train and predict steps for a GPU or TPU machine from a CPU, and estimate them:

    python scripts/lower.py --model=tft|cnn_bilstm --target=a100|h100x8|tpu_v5e_8|tpu_v4_32
        [--dtype=auto|float32|bfloat16] [--config=configs/<model>.py]

prints one JSON line. The target's recorded snapshot (pdm_jax/hardware/targets.py) goes through
the same `hardware.detect` and `hardware.decide` as `main`, and `training.state.resolve` writes
the decisions into the config; then the train step and predict step are built by the library
functions the training loop uses, over a mesh of that many fake CPU devices (the script sets
XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts; 16 for a v4-32, whose
4 hosts hold 4 chips each), and exported with `jax.export` for platform `cuda` or `tpu`. So a
step that cannot be lowered for the machine, or a layout that cannot be built there, fails here
first, without the machine.

The estimate is a roofline, not a measurement: per device, max(FLOPs / peak FLOP/s of the
dtype, bytes / HBM bandwidth). FLOPs and bytes are the cost analysis of the XLA:CPU compiled
module of the same step over the same mesh, which is per device (the SPMD partitioner has
split the batch). XLA's cost analysis counts a while loop's body once, so each loop body
(the LSTM scans, accumulation microbatches, prediction chunks) is costed again on its own and
multiplied by its known trip count. Caveats: XLA:CPU's fusion is not the GPU's or TPU's, it
has no bf16 dot (bf16 matmul operands are converted to fp32 there, so bytes of bf16 steps are
over-counted), and collectives, kernel launches and per-step loop overhead are left out. Bad
flags or config: one `error: ...` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple, NoReturn

from pdm_jax.hardware import targets

DTYPES = ("auto", "float32", "bfloat16")
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\d+")
# The collectives counted in the compiled train step: an all-gather of activations there is a
# batch the partitioner could not keep split.
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


class UsageError(Exception):
    """A bad flag: reported like every other error of the scripts here, one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from pdm_jax import models

    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=models.MODEL_NAMES)
    parser.add_argument("--target", required=True, choices=tuple(targets.TARGETS))
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="compute dtype; 'auto' lets the layout decide for the target, as `main` would",
    )
    parser.add_argument("--config", default=None, help="config file (default configs/<model>.py)")
    return parser.parse_args(argv)


def force_host_devices(argv: Sequence[str]) -> None:
    """Gives the CPU backend as many devices as `--target` has. Must run before jax is imported:
    XLA reads $XLA_FLAGS once, when the backend starts. The LLVM optimisation level is lowered
    too (when not set): it halves compile time and the cost analysis reads the HLO, not LLVM's
    code."""
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--target=")), None)
    if name is None and "--target" in argv[:-1]:
        name = argv[list(argv).index("--target") + 1]
    if name not in targets.TARGETS:
        return  # parse_args reports it
    flags = _DEVICE_FLAG.sub("", os.environ.get("XLA_FLAGS", "")).split()
    flags.append(f"--xla_force_host_platform_device_count={targets.TARGETS[name].num_devices}")
    if not any(f.startswith("--xla_backend_optimization_level") for f in flags):
        flags.append("--xla_backend_optimization_level=0")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def load_config(args: argparse.Namespace) -> Any:
    """configs/<model>.py or --config, with --dtype applied as an explicit config value."""
    from pdm_jax import cli, configuration

    if args.config is None:
        config = configuration.load_config(args.model)
    else:
        problem = cli.config_file_error(args.config)
        if problem:
            raise UsageError(problem)
        config = configuration.load_config(args.config)
    if config.model.name != args.model:
        raise UsageError(
            f"--config: {args.config} configures model {config.model.name!r}, not "
            f"--model={args.model}"
        )
    if args.dtype != "auto":
        config.compute.dtype = args.dtype
    configuration.validate(config)
    return config


class Plan(NamedTuple):
    platform: Any  # hardware.Platform
    layout: Any  # hardware.Layout
    config: Any  # the config with every 'auto' resolved, as the run would save it


def plan(config: Any, target: targets.Target) -> Plan:
    """What `main` would decide on the target: detection, layout, resolved config."""
    from pdm_jax import hardware
    from pdm_jax.training import state

    platform = hardware.detect(target.snapshot())
    layout = hardware.decide(platform, config)
    return Plan(platform, layout, state.resolve(config, layout))


class Steps(NamedTuple):
    train: Any  # the jitted train step, as training.loop builds it
    predict: Any  # the jitted predict step, as training.loop builds it
    train_args: tuple[Any, ...]  # ShapeDtypeStructs carrying the mesh's shardings
    predict_args: tuple[Any, ...]
    spec: Any
    graphdef: Any
    params: Any  # host parameters, fp32
    prepared: Any  # the data the shapes come from


def _abstract(tree: Any, sharding: Any) -> Any:
    import jax
    import numpy as np

    def one(x: Any) -> Any:
        x = x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def build_steps(config: Any, layout: Any, mesh: Any) -> Steps:
    """The train and predict steps of a resolved config over `mesh` (a Mesh, or an AbstractMesh
    when only exporting), with arguments shaped as the loop feeds them: the global batch, and
    the evaluation batch (`training.evaluation.eval_batch_size`)."""
    import jax
    import numpy as np

    from pdm_jax import hardware, models, parallel, prediction
    from pdm_jax.data import dataset
    from pdm_jax.models import layers
    from pdm_jax.optim import make_optimizer
    from pdm_jax.training import evaluation, steps

    prepared = dataset.prepare(config.data, config.seed)
    spec = layers.spec_from_config(
        config.model, len(prepared.inputs), config.data.window, dtype=layout.dtype
    )
    graphdef, params = models.init(spec, config.seed)
    optimizer, _ = make_optimizer(config.train, spec.ensemble)
    options = hardware.compiler_options(layout)
    noise = float(config.train.input_noise)
    train = steps.make_train_step(
        graphdef, spec, optimizer, mesh, layout.grad_accum, config.seed, options, noise
    )
    chunk = int(layout.infer_microbatch)
    predict = prediction.make_predict_step(graphdef, spec, mesh, options, chunk)
    replicated, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    train_ids = np.arange(layout.global_batch) % len(prepared.train)
    batch = steps.host_arrays(prepared.train.gather(train_ids))
    windows = prepared.val if prepared.val is not None else prepared.train
    size = evaluation.eval_batch_size(len(windows), mesh.shape[parallel.DATA], chunk)
    inputs = prediction.model_inputs(windows.gather(np.arange(size) % len(windows)))
    state = _abstract(params, replicated)
    train_args = (
        state,
        _abstract(jax.eval_shape(optimizer.init, params), replicated),
        _abstract(batch, split),
        jax.ShapeDtypeStruct((), np.int32, sharding=replicated),
    )
    predict_args = (state, _abstract(inputs, split))
    return Steps(train, predict, train_args, predict_args, spec, graphdef, params, prepared)


def export(steps: Steps, platforms: Sequence[str]) -> tuple[Any, Any]:
    """(train, predict) as `jax.export.Exported` for `platforms` ('cuda', 'tpu', 'cpu')."""
    import jax

    train = jax.export.export(steps.train, platforms=tuple(platforms))(*steps.train_args)
    predict = jax.export.export(steps.predict, platforms=tuple(platforms))(*steps.predict_args)
    return train, predict


# --- cost: XLA:CPU's cost analysis, per device, with loop bodies counted per iteration -------

_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_WHILE = re.compile(r" while\(.*\bbody=([\w.\-]+)")
_CALLED = re.compile(
    r"\b(?:calls|to_apply|condition|body|\w*_computations?)=(?:\{([^}]*)\}|([\w.\-]+))"
)


def _callees(text: str) -> list[str]:
    """The computations an instruction (or a block of them) names as called."""
    return [
        name.strip()
        for listed, single in _CALLED.findall(text)
        for name in (listed.split(",") if listed else [single])
    ]


def _computations(text: str) -> dict[str, str]:
    """name -> text of each computation of a printed HloModule, in printed order (callees
    first); the entry's text starts with 'ENTRY '."""
    blocks, current = {}, None
    for line in text.splitlines():
        if current is None and line.endswith("{") and not line.startswith("HloModule"):
            name = line.removeprefix("ENTRY ").split(" ", 1)[0].lstrip("%")
            current = [line]
        elif current is not None:
            current.append(line)
            if line == "}":
                blocks[name] = "\n".join(current)
                current = None
    return blocks


def _loops_under(blocks: dict[str, str], name: str) -> list[tuple[str, int | None]]:
    """(body, trip count or None) of each while loop `name` runs directly, not inside another
    loop: found through every computation it calls, stopping at loop bodies."""
    found, seen, todo = [], {name}, [name]
    while todo:
        for line in blocks[todo.pop()].splitlines():
            loop = _WHILE.search(line)
            if loop:
                trips = _TRIPS.search(line)
                found.append((loop.group(1), int(trips.group(1)) if trips else None))
                continue
            for callee in _callees(line):
                if callee in blocks and callee not in seen:
                    seen.add(callee)
                    todo.append(callee)
    return found


def _cost_once(blocks: dict[str, str], entry: str, client: Any) -> dict[str, float]:
    """XLA's cost analysis of computation `entry` alone (its loops' bodies counted once)."""
    import jaxlib._hlo as hlo
    from jax._src.lib import _jax

    needed, todo = {entry}, [entry]
    while todo:
        for callee in _callees(blocks[todo.pop()]):
            if callee in blocks and callee not in needed:
                needed.add(callee)
                todo.append(callee)
    parts = [
        ("ENTRY " + text.removeprefix("ENTRY ")) if name == entry else text.removeprefix("ENTRY ")
        for name, text in blocks.items()
        if name in needed
    ]
    module = hlo.hlo_module_from_text("HloModule loop_body\n\n" + "\n\n".join(parts) + "\n")
    return _jax.hlo_module_cost_analysis(client, module)


def compiled_cost(compiled: Any) -> dict[str, Any]:
    """Per-device FLOPs and bytes of a compiled step, every loop body times its trip count
    (a loop whose count XLA does not know is counted once, and said so). Each body is costed
    as a module of its own through jaxlib's HLO parser and cost analysis: private entry points
    of the pinned jax 0.10, which no public API offers per computation."""
    import jax
    import jaxlib._hlo as hlo

    options = hlo.HloPrintOptions.short_parsable()
    options.print_metadata = False
    text = compiled.runtime_executable().hlo_modules()[0].to_string(options)
    blocks = _computations(text)
    entry = next(n for n, t in blocks.items() if t.startswith("ENTRY "))
    client = jax.devices("cpu")[0].client
    keys = ("flops", "bytes accessed")
    once: dict[str, dict[str, float]] = {}
    counts = {"loops": 0, "unknown_trips": 0}

    def cost(name: str) -> dict[str, float]:
        """name's cost with its loops' bodies per iteration; 'iterations': bodies run."""
        if name not in once:
            once[name] = _cost_once(blocks, name, client)
        total = {k: float(once[name].get(k, 0.0)) for k in keys} | {"iterations": 0.0}
        for body, trips in _loops_under(blocks, name):
            counts["loops"] += 1
            counts["unknown_trips"] += trips is None
            inner, single = cost(body), once[body]
            for k in keys:
                total[k] += (trips or 1) * inner[k] - float(single.get(k, 0.0))
            total["iterations"] += (trips or 1) * (1 + inner["iterations"])
        return total

    total = cost(entry)
    collectives = {c: len(re.findall(rf" {c}(?:-start)?\(", text)) for c in COLLECTIVES}
    return {
        "flops": total["flops"],
        "bytes": total["bytes accessed"],
        "loop_iterations": int(total["iterations"]),
        **counts,
        "collectives": {c: n for c, n in collectives.items() if n},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON record for one model on one target."""
    import jax

    from pdm_jax import parallel

    target = targets.target(args.target)
    if jax.device_count() < target.num_devices:
        raise UsageError(
            f"--target={target.name} needs {target.num_devices} devices and jax has "
            f"{jax.device_count()}: run the script as a program (it sets XLA_FLAGS) or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={target.num_devices}"
        )
    chosen = plan(load_config(args), target)
    layout = chosen.layout
    mesh = parallel.make_mesh(layout.mesh_shape, jax.devices()[: target.num_devices])
    steps = build_steps(chosen.config, layout, mesh)
    train_export, predict_export = export(steps, [target.platform])
    # Compiled for the fake CPU devices the arguments are sharded over: per-device modules.
    train = compiled_cost(steps.train.lower(*steps.train_args).compile())
    predict = compiled_cost(steps.predict.lower(*steps.predict_args).compile())
    step_s, bound = target.roofline(train["flops"], train["bytes"], layout.dtype)
    predict_s, predict_bound = target.roofline(predict["flops"], predict["bytes"], layout.dtype)
    predict_batch = int(steps.predict_args[1]["x"].shape[0])
    return {
        "model": args.model,
        "target": target.name,
        "platform": target.platform,
        "devices": target.num_devices,
        "processes": chosen.platform.process_count,
        "mesh": list(layout.mesh_shape),
        "dtype": layout.dtype,
        "global_batch": layout.global_batch,
        "per_device_batch": layout.per_device_batch,
        "grad_accum": layout.grad_accum,
        "remat": list(layout.remat),
        "infer_microbatch": layout.infer_microbatch,
        "lowered": True,
        # The exported StableHLO (jax.export.serialize would wrap it in a flatbuffer, which needs
        # the flatbuffers package: not a dependency here).
        "stablehlo_bytes": {
            "train": len(train_export.mlir_module_serialized),
            "predict": len(predict_export.mlir_module_serialized),
        },
        "cost": "XLA:CPU compiled module, per device, loop bodies x trip count",
        "flops_per_step": train["flops"],
        "bytes_per_step": train["bytes"],
        "loops": train["loops"],
        "loop_iterations": train["loop_iterations"],
        "unknown_trips": train["unknown_trips"],
        "collectives": train["collectives"],
        "est_step_ms": round(1000 * step_s, 6),
        "est_samples_per_s": round(layout.global_batch / step_s),
        "bound": bound,
        "predict_batch": predict_batch,
        "predict_flops": predict["flops"],
        "predict_bytes": predict["bytes"],
        "predict_est_ms": round(1000 * predict_s, 6),
        "predict_windows_per_s": round(predict_batch / predict_s),
        "predict_bound": predict_bound,
        "predict_collectives": predict["collectives"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    from pdm_jax.errors import PdmError

    try:
        record = run(parse_args(argv))
    except (UsageError, PdmError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    force_host_devices(sys.argv[1:])
    sys.exit(main())
