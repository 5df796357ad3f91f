"""Speed and memory of the models and the input pipeline, one JSON object per measurement.

    python scripts/benchmark.py --model=tft --batch=256 --steps=200 [--dtype=float32|bfloat16]
        [--remat] [--what=train,infer,data,memory,checkpoint] [--infer_batch=1024]
        [--storage=local,s3,gs,az] [--checkpoint_uri=URI,...] [--save_every=100]
        [--window=30] [--grad_accum=auto] [--infer_microbatch=auto] [--synthetic_units=N]
        [--set KEY=VALUE ...]

`checkpoint`: for the model's full training state (params, AdamW state, best params), how long
`CheckpointStore.save()` blocks the loop, how long the whole async save takes, how long a restore
takes, and the overhead on training: `--save_every` train steps with one save started at their
start (finished before the clock stops) against the same steps without. `--storage` picks the
backends: `local` (a temporary directory) and `s3`, `gs`, `az` on the test suite's local servers
(moto, gcp-storage-emulator, Azurite; needs a repository checkout); `--checkpoint_uri` adds real
stores (comma-separated; credentials from the usual environment chains).

Runs on C-MAPSS FD001 windows (embedded), or with `--synthetic_units=N` on synthetic data of
that many training units (a scale curve: samples/s should stay flat and host memory grow only
with the data, since windows are index ranges). `peak_bytes` is the device's peak memory where
the backend reports it (GPU/TPU; null on CPU). JSON on stdout, progress on stderr. Speeds are
medians over steady-state steps (compile and warm-up excluded, `block_until_ready` on every
step). Run it beside ../shared/peers/run_all.sh and compare ratios, not absolute figures, across
machines.
"""

from __future__ import annotations

import argparse
import ast
import json
import resource
import sys
import time
from typing import Any

import jax
import numpy as np
import optax


def _log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _base(args: argparse.Namespace, spec: Any, params: Any, malloc_tuned: bool) -> dict[str, Any]:
    import flax

    devices = jax.devices()
    return {
        "model": args.model,
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "batch": args.batch,
        "window": spec.window,
        "features": spec.num_features,
        "dtype": args.dtype,
        "remat": list(spec.remat),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "malloc_tuned": malloc_tuned,
    }


def _timed(fn: Any, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for i in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
        if (i + 1) % 50 == 0:
            _log(f"  {i + 1}/{steps} steps")
    return times


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _device_peak_bytes() -> int | None:
    """Peak device memory where the backend reports it (GPU, TPU); None on CPU."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without the query raise rather than return None
        return None
    peak = stats.get("peak_bytes_in_use")
    return int(peak) if peak is not None else None


def _overrides(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs; values read as Python literals (8, 0.3, (32, 32)), else text."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE, e.g. model.tft.hidden=8")
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out


def _grad_accum(requested: str | int, config: Any, hardware: Any) -> int:
    """--grad_accum as a number: 'auto' asks the same layout decision `main` makes here."""
    if str(requested) != "auto":
        if not str(requested).isdigit() or int(requested) < 1:
            raise SystemExit(
                f"error: --grad_accum: expected 'auto' or an integer >= 1, got {requested!r}"
            )
        return int(requested)
    config.train.grad_accum = "auto"
    layout = hardware.decide(hardware.detect(hardware.gather()), config)
    _log(f"train: grad_accum {layout.grad_accum} (auto, as main decides on this machine)")
    return int(layout.grad_accum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tft", "cnn_bilstm"], default="tft")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--infer_batch", type=int, default=1024)
    parser.add_argument(
        "--infer_microbatch",
        default="auto",
        help="windows per chunk of the prediction batch (config.compute.infer_microbatch); "
        "'auto' decides for this backend and model, 0 = whole batch",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=30,
        help="window length; 30, the PyTorch peers' (shared/peers), for like-for-like ratios",
    )
    parser.add_argument(
        "--grad_accum",
        default="auto",
        help="microbatches per train step (same global batch); 'auto' (default) decides as "
        "`main` would on this machine (train.grad_accum='auto')",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. model.tft.hidden=8 (repeatable)",
    )
    parser.add_argument(
        "--synthetic_units",
        type=int,
        default=0,
        help="synthetic run-to-failure data with this many training units instead of FD001 "
        "(scale curves: samples/s and host memory against data size)",
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--remat", action="store_true", help="rematerialise every block")
    parser.add_argument("--what", default="train,infer,data")
    parser.add_argument("--storage", default="local", help="comma-separated: local,s3,gs,az")
    parser.add_argument("--checkpoint_uri", default="", help="comma-separated extra stores")
    parser.add_argument("--save_every", type=int, default=100)
    parser.add_argument("--saves", type=int, default=3, help="saves timed per URI")
    parser.add_argument(
        "--no_malloc_tuning",
        action="store_true",
        help="measure without pdm_jax.hostmem.tune() (glibc thresholds)",
    )
    args = parser.parse_args(argv)
    what = set(args.what.split(","))

    from pdm_jax import hostmem

    malloc_tuned = False if args.no_malloc_tuning else hostmem.tune()

    from pdm_jax import configuration, hardware, models, prediction
    from pdm_jax.data import dataset
    from pdm_jax.data.pipeline import TrainIterator
    from pdm_jax.models import layers
    from pdm_jax.training import steps

    config = configuration.load_config(args.model)
    config.train.batch_size = args.batch
    config.data.window = args.window
    if args.synthetic_units:
        config.data.source = "synthetic"
        config.data.synthetic.num_units = args.synthetic_units
        config.data.synthetic.test_units = 10
    for key, value in _overrides(args.set).items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if hasattr(node, "get") else None
        if not hasattr(node, "get") or leaf not in node:
            raise SystemExit(f"error: --set: unknown config key {key!r}")
        try:
            node[leaf] = value
        except (TypeError, ValueError) as err:
            raise SystemExit(f"error: --set: {key}: {err}") from None
    start = time.perf_counter()
    prepared = dataset.prepare(config.data, config.seed)
    prepare_s = time.perf_counter() - start
    blocks = {"tft": ("vsn", "lstm", "attention"), "cnn_bilstm": ("conv", "lstm")}[args.model]

    def build(batch: int, remat: bool) -> tuple[Any, Any, Any]:
        config.model.remat = blocks if remat else ()
        spec = layers.spec_from_config(
            config.model, prepared.train.features.shape[1], config.data.window, dtype=args.dtype
        )
        graphdef, params = models.init(spec, config.seed)
        return spec, graphdef, params

    spec, graphdef, params = build(args.batch, args.remat)
    args.grad_accum = _grad_accum(args.grad_accum, config, hardware)
    base = {
        **_base(args, spec, params, malloc_tuned),
        "data_source": f"synthetic:{args.synthetic_units}" if args.synthetic_units else "FD001",
        "train_windows": len(prepared.train),
        "prepare_s": round(prepare_s, 2),
    }
    iterator = TrainIterator(prepared.train, args.batch, config.seed, prefetch=0, num_threads=0)
    batches = [steps.train_arrays(next(iterator)) for _ in range(8)]

    if "train" in what:
        _log(f"train: {args.model}, batch {args.batch}, {args.steps} steps")
        optimizer = optax.adam(config.train.learning_rate)
        opt_state = optimizer.init(params)
        train_step = steps.make_train_step(graphdef, spec, optimizer, grad_accum=args.grad_accum)
        start = time.perf_counter()
        compiled = train_step.lower(params, opt_state, batches[0], np.int32(0)).compile()
        compile_s = time.perf_counter() - start
        state = {"params": params, "opt": opt_state, "i": 0}

        def one() -> Any:
            i = state["i"]
            state["params"], state["opt"], metrics = compiled(
                state["params"], state["opt"], batches[i % len(batches)], np.int32(i)
            )
            state["i"] = i + 1
            return metrics["loss"]

        times = np.asarray(_timed(one, args.steps, args.warmup))
        print(
            json.dumps(
                {
                    **base,
                    "what": "train",
                    "grad_accum": args.grad_accum,
                    "compile_s": round(compile_s, 2),
                    "train_samples_per_s": round(args.batch / float(np.median(times)), 1),
                    "step_ms_p50": round(1000 * float(np.median(times)), 2),
                    "step_ms_p90": round(1000 * float(np.percentile(times, 90)), 2),
                    "peak_host_rss_mb": round(_peak_rss_mb(), 1),
                    "peak_bytes": _device_peak_bytes(),
                }
            ),
            flush=True,
        )
        params = state["params"]

    if "infer" in what:
        _log(f"infer: batch {args.infer_batch}")
        microbatch, _, why = hardware.decide_infer_microbatch(
            jax.default_backend(), args.model, args.infer_microbatch
        )
        _log(f"infer: microbatch {microbatch} ({why or 'set by --infer_microbatch'})")
        predict = prediction.make_predict_step(graphdef, spec, microbatch=microbatch)
        ids = np.arange(args.infer_batch) % len(prepared.train)
        batch = steps.train_arrays(prepared.train.gather(ids))
        start = time.perf_counter()
        compiled = predict.lower(params, batch).compile()
        compile_s = time.perf_counter() - start
        times = np.asarray(_timed(lambda: compiled(params, batch)["pred"], args.steps, args.warmup))
        print(
            json.dumps(
                {
                    **base,
                    "what": "infer",
                    "infer_batch": args.infer_batch,
                    "infer_microbatch": microbatch,
                    "compile_s": round(compile_s, 2),
                    "infer_windows_per_s": round(args.infer_batch / float(np.median(times)), 1),
                    "peak_host_rss_mb": round(_peak_rss_mb(), 1),
                }
            ),
            flush=True,
        )

    if "memory" in what:
        record = {**base, "what": "memory"}
        for remat in (False, True):
            _log(f"memory: compiled train step, remat={remat}")
            spec_m, graphdef_m, params_m = build(args.batch, remat)
            optimizer = optax.adam(1e-3)
            opt_state = optimizer.init(params_m)
            train_step = steps.make_train_step(graphdef_m, spec_m, optimizer)
            compiled = train_step.lower(params_m, opt_state, batches[0], np.int32(0)).compile()
            analysis = compiled.memory_analysis()
            suffix = "_remat" if remat else ""
            record[f"temp_bytes{suffix}"] = int(analysis.temp_size_in_bytes)
        # Compiled on the whole batch whatever --grad_accum says: what remat saves per sample.
        print(json.dumps({**record, "grad_accum": 1}), flush=True)

    if "checkpoint" in what:
        import checkpoint_bench

        for record in checkpoint_bench.run(args, config, graphdef, spec, params, batches, _log):
            print(json.dumps({**base, **record}), flush=True)

    if "data" in what:
        _log("data: grain pipeline alone")
        it = dataset.train_batches(prepared, config)
        times = np.asarray(_timed(lambda: next(it)["x"], args.steps, args.warmup))
        print(
            json.dumps(
                {
                    **base,
                    "what": "data",
                    "data_windows_per_s": round(args.batch / float(np.median(times)), 1),
                    "peak_host_rss_mb": round(_peak_rss_mb(), 1),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
