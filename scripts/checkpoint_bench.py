"""The `checkpoint` measurement of scripts/benchmark.py: save/restore times and training overhead.

Kept apart from benchmark.py because it may start the test suite's storage servers
(tests/servers.py), which only a repository checkout has.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]


BACKENDS = ("local", "s3", "gs", "az")


@contextlib.contextmanager
def _emulators(root: Path, schemes: list[str]) -> Iterator[list[str]]:
    """Starts the test suite's server for each of `schemes` (moto for s3, gcp-storage-emulator
    for gs, Azurite for az) on 127.0.0.1, sets their clients' standard variables, and yields one
    fresh bucket URI on each."""
    sys.path.insert(0, str(REPO))
    from tests import servers

    make = {
        "s3": lambda: servers.MotoS3Server(root / "s3"),
        "gs": lambda: servers.GcsEmulatorServer(root / "gcs"),
        "az": lambda: servers.AzuriteServer(
            root / "az", servers.ensure_azurite(servers.node_prefix())
        ),
    }
    started = [make[scheme]() for scheme in schemes]
    with contextlib.ExitStack() as stack:
        for server in started:
            server.start()
            stack.callback(server.stop)
            stack.enter_context(server.environ())
        yield [server.make_bucket() + "/bench" for server in started]


def _median(values: list[float]) -> float:
    return round(float(np.median(values)), 3)


def _train_seconds(step: Callable[[int], Any], steps: int, save: Callable[[], Any] | None) -> float:
    """Seconds for `steps` train steps; with `save`, one async save started before the first
    step and waited for after the last (so its whole cost lands inside the window)."""
    start = time.perf_counter()
    finish = save() if save else None
    for i in range(steps):
        jax.block_until_ready(step(i))
    if finish:
        finish()
    return time.perf_counter() - start


def run(
    args: Any,
    config: Any,
    graphdef: Any,
    spec: Any,
    params: Any,
    batches: list[Any],
    log: Callable[[str], None],
) -> Iterator[dict[str, Any]]:
    from pdm_jax import checkpoint, optim
    from pdm_jax.training import steps

    optimizer, _ = optim.make_optimizer(config.train)
    opt_state = optimizer.init(params)
    train_step = steps.make_train_step(graphdef, spec, optimizer)
    compiled = train_step.lower(params, opt_state, batches[0], np.int32(0)).compile()
    live = {"params": params, "opt": opt_state}

    def step(i: int) -> Any:
        live["params"], live["opt"], metrics = compiled(
            live["params"], live["opt"], batches[i % len(batches)], np.int32(i)
        )
        return metrics["loss"]

    def state() -> dict[str, Any]:
        return {"params": live["params"], "opt_state": live["opt"], "best_params": live["params"]}

    state_mb = sum(x.nbytes for x in jax.tree.leaves(state())) / 2**20
    meta = {"data": {"next_batch": 0}, "config": config.to_dict(), "fingerprint": "0" * 64}
    for i in range(3):
        jax.block_until_ready(step(i))  # warm
    with tempfile.TemporaryDirectory(prefix="pdm-ckpt-bench-") as tmp, contextlib.ExitStack() as st:
        storage = [b for b in args.storage.split(",") if b]
        unknown = sorted(set(storage) - set(BACKENDS))
        if unknown:
            raise SystemExit(f"error: --storage: unknown {unknown}; expected some of {BACKENDS}")
        uris = [u for u in args.checkpoint_uri.split(",") if u]
        if "local" in storage:
            uris.insert(0, str(Path(tmp) / "local"))
        remote = [b for b in storage if b != "local"]
        if remote:
            uris += st.enter_context(_emulators(Path(tmp) / "servers", remote))
        log(f"checkpoint: baseline, {args.save_every} train steps without saves")
        baseline = [_train_seconds(step, args.save_every, None)]
        for uri in uris:
            scheme = checkpoint.scheme_of(uri)
            log(f"checkpoint: {scheme}, {args.saves} saves of {state_mb:.1f} MiB")
            blocked, total, restored = [], [], []
            with checkpoint.CheckpointStore(uri, keep=2, keep_best=False) as store:
                for n in range(1, args.saves + 1):
                    start = time.perf_counter()
                    assert store.save(n, state(), meta), f"save to {scheme} did not start"
                    blocked.append(time.perf_counter() - start)
                    assert store.wait(), f"save to {scheme} failed"
                    total.append(time.perf_counter() - start)
                target = jax.tree.map(np.zeros_like, state())
                for _ in range(args.saves):
                    start = time.perf_counter()
                    store.restore(target)
                    restored.append(time.perf_counter() - start)

                def save_once(store: Any = store) -> Callable[[], Any]:
                    store.save(args.saves + 1, state(), meta)
                    return store.wait

                log(f"checkpoint: {scheme}, {args.save_every} train steps with one save")
                with_save = _train_seconds(step, args.save_every, save_once)
            baseline.append(_train_seconds(step, args.save_every, None))
            reference = float(np.median(baseline))
            yield {
                "what": "checkpoint",
                "backend": scheme,
                "state_mib": round(state_mb, 2),
                "save_blocking_s_p50": _median(blocked),
                "save_total_s_p50": _median(total),
                "restore_s_p50": _median(restored),
                "save_every": args.save_every,
                "train_s_without_saves": round(reference, 2),
                "train_s_with_one_save": round(with_save, 2),
                "overhead_pct": round(100 * (with_save - reference) / reference, 2),
                "baseline_runs_s": [round(b, 2) for b in baseline],
            }
